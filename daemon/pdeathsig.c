/*
 * agentd-pdeathsig: arm PR_SET_PDEATHSIG=SIGKILL, then exec the agent.
 *
 *     agentd-pdeathsig PARENT_PID PROGRAM [ARG...]
 *
 * Python's subprocess can only set a death signal through preexec_fn, which
 * forces fork() instead of vfork() and runs Python in the child — several
 * milliseconds per spawn, and unsafe next to ZeroMQ's threads. util-linux's
 * `setpriv --pdeathsig KILL` works but costs ~0.6 ms per exec (dynamic
 * linking, option parsing). This static program costs ~0.15 ms; agentd builds
 * it when the package is built and falls back to setpriv without it.
 *
 * PARENT_PID closes the race where the daemon dies between fork and prctl: the
 * death signal would never fire, so if our parent is no longer the daemon we
 * exit instead of running an orphaned agent.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
#include <errno.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fputs("usage: agentd-pdeathsig PARENT_PID PROGRAM [ARG...]\n", stderr);
        return 127;
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) {
        perror("agentd-pdeathsig: prctl");
        return 127;
    }
    if (getppid() != (pid_t)strtol(argv[1], NULL, 10)) {
        return 127; /* the daemon is already gone */
    }
    execv(argv[2], argv + 2);
    fprintf(stderr, "agentd-pdeathsig: exec %s: %s\n", argv[2], strerror(errno));
    return 127;
}
