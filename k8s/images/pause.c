/* The test cluster's pause container: holds a pod's namespaces, reaps orphans, exits on SIGINT or SIGTERM.
 * Built statically by `cargo xtask cluster` (no registry is reachable, so no upstream pause image). */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int signal) {
    (void)signal;
    _exit(0);
}

static void reap(int signal) {
    (void)signal;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction action = {0};
    action.sa_handler = quit;
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    action.sa_handler = reap;
    action.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGCHLD, &action, NULL);
    for (;;) {
        pause();
    }
}
