/*
 * agentd-pdeathsig: the exec trampoline between the daemon's fork and the agent.
 *
 *     agentd-pdeathsig PARENT_PID [--cgroup=PROCS_FILE]... [--uid=N] [--gid=N]
 *                      [--groups=G,G,...] PROGRAM [ARG...]
 *
 * In this order, before the agent runs a single instruction of its own:
 * 1. writes its PID into each PROCS_FILE: the cgroup.procs of the agent's cgroup
 *    (the cgroup2 one, and on hybrid hosts the v1 memory/pids/cpu ones), as root;
 * 2. drops privileges when told to: setgroups, then setresgid, then setresuid;
 * 3. arms PR_SET_PDEATHSIG=SIGKILL, after 2 because a credential change clears
 *    it (PARENT_PID 0: no death signal, for `death_signal = false`);
 * 4. execs PROGRAM, an absolute path (the daemon resolved it), so an option is
 *    never taken for the program.
 *
 * Python's subprocess can only do 1 and 3 through preexec_fn, which forces fork()
 * instead of vfork() and runs Python in the child: several milliseconds per spawn,
 * and unsafe next to ZeroMQ's threads. util-linux's `setpriv` does 2 and 3 (~0.6 ms
 * per exec: dynamic linking, option parsing; agentd falls back to it, behind a
 * `sh -c` for 1); this static program costs ~0.15 ms.
 *
 * PARENT_PID closes the race where the daemon dies between fork and prctl: the
 * death signal would never fire, so if our parent is no longer the daemon we exit
 * instead of running an orphaned agent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_GROUPS 65536

static int fail(const char *what, const char *detail) {
    fprintf(stderr, "agentd-pdeathsig: %s%s%s: %s\n", what, detail ? " " : "", detail ? detail : "",
            strerror(errno));
    return 127;
}

static int starts(const char *arg, const char *prefix) {
    return strncmp(arg, prefix, strlen(prefix)) == 0;
}

/* Write our PID into a cgroup.procs file: the kernel moves this process there. */
static int join_cgroup(const char *procs) {
    char pid[32];
    int len = snprintf(pid, sizeof pid, "%ld", (long)getpid());
    int fd = open(procs, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, pid, (size_t)len);
    int saved = errno;
    close(fd);
    errno = saved;
    return n == len ? 0 : -1;
}

static int parse_groups(const char *list, gid_t *out, size_t *count) {
    *count = 0;
    while (*list) {
        char *end;
        errno = 0;
        unsigned long value = strtoul(list, &end, 10);
        if (errno || end == list || *count >= MAX_GROUPS) return -1;
        out[(*count)++] = (gid_t)value;
        if (*end == ',') end++;
        else if (*end) return -1;
        list = end;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fputs("usage: agentd-pdeathsig PARENT_PID [--cgroup=FILE]... [--uid=N] [--gid=N] "
              "[--groups=G,..] PROGRAM [ARG...]\n",
              stderr);
        return 127;
    }
    long parent = strtol(argv[1], NULL, 10);
    long uid = -1, gid = -1;
    const char *groups = NULL;
    int i = 2;
    for (; i < argc && starts(argv[i], "--"); i++) {
        const char *arg = argv[i];
        if (starts(arg, "--cgroup=")) {
            if (join_cgroup(arg + 9) != 0) return fail("cgroup", arg + 9);
        } else if (starts(arg, "--uid=")) {
            uid = strtol(arg + 6, NULL, 10);
        } else if (starts(arg, "--gid=")) {
            gid = strtol(arg + 6, NULL, 10);
        } else if (starts(arg, "--groups=")) {
            groups = arg + 9;
        } else if (strcmp(arg, "--") == 0) {
            i++;
            break;
        } else {
            fprintf(stderr, "agentd-pdeathsig: unknown option %s\n", arg);
            return 127;
        }
    }
    if (i >= argc) {
        fputs("agentd-pdeathsig: no program\n", stderr);
        return 127;
    }
    if (groups != NULL) {
        static gid_t list[MAX_GROUPS];
        size_t count;
        if (parse_groups(groups, list, &count) != 0) {
            fprintf(stderr, "agentd-pdeathsig: bad --groups=%s\n", groups);
            return 127;
        }
        if (setgroups(count, list) != 0) return fail("setgroups", NULL);
    }
    if (gid >= 0 && setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) != 0) return fail("setgid", NULL);
    if (uid >= 0 && setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0) return fail("setuid", NULL);
    if (parent != 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) return fail("prctl", NULL);
        if (getppid() != (pid_t)parent) return 127; /* the daemon is already gone */
    }
    execv(argv[i], argv + i);
    return fail("exec", argv[i]);
}
