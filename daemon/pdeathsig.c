/*
 * agentd-pdeathsig: the exec trampoline between the daemon's fork and the agent.
 *
 *     agentd-pdeathsig PARENT_PID [--cgroup=FILE]... [--clone-into=DIR --pid-fd=N]
 *                      [--uid=N] [--gid=N] [--groups=G,G,...] [--] PROGRAM [ARG...]
 *
 * In this order, before the agent runs a single instruction of its own:
 * 1. joins each cgroup FILE names by writing "0" (this process) into it: a v1
 *    `tasks` file (the memory/pids/cpu hierarchies of a hybrid host; one thread,
 *    so the kernel needs no global lock), or a `cgroup.procs`, as root;
 * 2. with --clone-into, the agent is born in that cgroup2 directory instead of
 *    moving there: clone3(CLONE_INTO_CGROUP | CLONE_PARENT | CLONE_VFORK) makes it
 *    a child of the daemon (our parent), in its own session (the daemon starts us
 *    without one: a setsid() costs up to milliseconds, one is enough); it writes
 *    its PID into fd N, and we exit once it has exec'd. Moving a process (cgroup.procs) takes the kernel's threadgroup lock for
 *    writing, which waits for an RCU grace period when it was idle: ~7-14 ms per
 *    restart on a busy host, where clone3 costs ~0.1 ms. Without clone3 (Linux <
 *    5.7) we move into DIR/cgroup.procs, stay the agent, and write our own PID;
 * 3. drops privileges when told to: setgroups, then setresgid, then setresuid;
 * 4. arms PR_SET_PDEATHSIG=SIGKILL, after 3 because a credential change clears
 *    it (PARENT_PID 0: no death signal, for `death_signal = false`), and checks
 *    that the parent is still PARENT_PID;
 * 5. execs PROGRAM, an absolute path (the daemon resolved it), so an option is
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
#include <linux/sched.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

#define MAX_GROUPS 65536

static int fail(const char *what, const char *detail) {
    fprintf(stderr, "agentd-pdeathsig: %s%s%s: %s\n", what, detail ? " " : "", detail ? detail : "",
            strerror(errno));
    return 127;
}

static int starts(const char *arg, const char *prefix) {
    return strncmp(arg, prefix, strlen(prefix)) == 0;
}

/* "0" into a tasks or cgroup.procs file: the kernel moves this process there. */
static int join_cgroup(const char *file) {
    int fd = open(file, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, "0", 1);
    int saved = errno;
    close(fd);
    errno = saved;
    return n == 1 ? 0 : -1;
}

static int write_pid(int fd, pid_t pid) {
    char text[32];
    int len = snprintf(text, sizeof text, "%ld\n", (long)pid);
    return write(fd, text, (size_t)len) == len ? 0 : -1;
}

/*
 * Start the agent in `dir` as the daemon's child (clone3). Returns 0 in the agent,
 * never in the trampoline (it exits); -1 if clone3 cannot (errno set), and then
 * nothing happened.
 */
static int clone_into(const char *dir, int pid_fd) {
    int cgroup = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cgroup < 0) return -1;
    struct clone_args args;
    memset(&args, 0, sizeof args);
    /* CLONE_VFORK: we wait until the agent has exec'd, so it runs at once on this CPU
     * (as Popen's vfork child does) instead of queueing behind us for one. */
    args.flags = CLONE_INTO_CGROUP | CLONE_PARENT | CLONE_VFORK;
    args.exit_signal = 0; /* must be: with CLONE_PARENT the kernel takes ours (SIGCHLD) */
    args.cgroup = (unsigned long long)cgroup;
    long child = syscall(SYS_clone3, &args, sizeof args);
    int saved = errno;
    close(cgroup);
    if (child < 0) {
        errno = saved;
        return -1;
    }
    if (child == 0) { /* the agent: the daemon learns its PID now, while it execs */
        if (write_pid(pid_fd, getpid()) != 0) _exit(fail("pid-fd", NULL));
        close(pid_fd);
        if (setsid() < 0) _exit(fail("setsid", NULL)); /* the agent leads its own group */
        return 0;
    }
    _exit(0); /* after the agent's exec (CLONE_VFORK); the daemon reaps us as a stray */
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
    long uid = -1, gid = -1, pid_fd = -1;
    const char *groups = NULL, *into = NULL;
    int i = 2;
    for (; i < argc && starts(argv[i], "--"); i++) {
        const char *arg = argv[i];
        if (starts(arg, "--cgroup=")) {
            if (join_cgroup(arg + 9) != 0) return fail("cgroup", arg + 9);
        } else if (starts(arg, "--clone-into=")) {
            into = arg + 13;
        } else if (starts(arg, "--pid-fd=")) {
            pid_fd = strtol(arg + 9, NULL, 10);
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
    if (into != NULL) {
        if (pid_fd < 0) {
            fputs("agentd-pdeathsig: --clone-into needs --pid-fd\n", stderr);
            return 127;
        }
        if (clone_into(into, (int)pid_fd) != 0) {
            if (errno != ENOSYS && errno != EINVAL && errno != E2BIG && errno != EOPNOTSUPP)
                return fail("clone3 into", into);
            char procs[4096]; /* an older kernel: move there, and be the agent ourselves */
            snprintf(procs, sizeof procs, "%s/cgroup.procs", into);
            if (join_cgroup(procs) != 0) return fail("cgroup", procs);
            if (write_pid((int)pid_fd, getpid()) != 0) return fail("pid-fd", NULL);
            close((int)pid_fd);
            if (setsid() < 0) return fail("setsid", NULL);
        }
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
