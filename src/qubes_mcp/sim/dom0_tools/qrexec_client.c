/*
 * The emulated dom0's qrexec-client, compiled when the host has a C compiler (else the
 * Python twin in qrexec_client.py is installed; both behave the same, see its docstring):
 *
 *     qrexec-client [-t] [-T] [-w TIMEOUT] -d DOMAIN USER:COMMAND
 *
 * It lives at ROOT/usr/lib/qubes/qrexec-client and finds ROOT from its own path, connects to
 * ROOT/run/qubes/qrexec.DOMAIN (the qube's agent), sends one REQUEST frame holding
 * USER:COMMAND, relays stdin as STDIN frames (an empty one at EOF), writes STDOUT/STDERR
 * frames to fd 1/2 and exits with the EXIT frame's status; 1 when the agent cannot be
 * reached or breaks the protocol, 2 on usage errors. Frames: type (1 byte), length (u32 big
 * endian), data; data frames are at most 65536 bytes (qubes_mcp/sim/qrexec/wire.py).
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

enum { REQUEST = 1, STDIN_F = 2, STDOUT_F = 3, STDERR_F = 4, EXIT_F = 5 };
#define MAX_DATA 65536u
#define MAX_REQUEST (65000u + 64u + 64u + 2u)

static unsigned char buf[MAX_DATA];

static int write_all(int fd, const unsigned char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* 0: read all; 1: clean EOF before the first byte; -1: error or EOF inside */
static int read_exact(int fd, unsigned char *data, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, data + got, len - got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            return got == 0 ? 1 : -1;
        got += (size_t)n;
    }
    return 0;
}

static int send_frame(int fd, unsigned type, const unsigned char *data, uint32_t len) {
    unsigned char header[5] = {(unsigned char)type, (unsigned char)(len >> 24),
                               (unsigned char)(len >> 16), (unsigned char)(len >> 8),
                               (unsigned char)len};
    if (write_all(fd, header, sizeof header) < 0)
        return -1;
    return len ? write_all(fd, data, len) : 0;
}

static int usage(void) {
    fputs("usage: qrexec-client [-t] [-T] [-w TIMEOUT] -d DOMAIN USER:COMMAND\n", stderr);
    return 2;
}

int main(int argc, char **argv) {
    const char *domain = NULL, *command = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-t") || !strcmp(argv[i], "-T"))
            continue;
        if (!strcmp(argv[i], "-w") && i + 1 < argc) {
            i++;
            continue;
        }
        if (!strcmp(argv[i], "-d") && i + 1 < argc) {
            domain = argv[++i];
            continue;
        }
        if (argv[i][0] == '-' || command != NULL)
            return usage();
        command = argv[i];
    }
    if (domain == NULL || command == NULL)
        return usage();
    if (!domain[0] || strchr(domain, '/') || !strcmp(domain, ".") || !strcmp(domain, "..")) {
        fprintf(stderr, "qrexec-client: invalid domain '%s'\n", domain);
        return 2;
    }
    size_t command_len = strlen(command);
    if (command_len > MAX_REQUEST) {
        fputs("qrexec-client: command too long\n", stderr);
        return 2;
    }

    /* ROOT is four levels above ROOT/usr/lib/qubes/qrexec-client */
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        return usage();
    exe[n] = '\0';
    for (int up = 0; up < 4; up++) {
        char *slash = strrchr(exe, '/');
        if (slash == NULL)
            return usage();
        *slash = '\0';
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    int len = snprintf(addr.sun_path, sizeof addr.sun_path, "%s/run/qubes/qrexec.%s", exe, domain);
    if (len < 0 || (size_t)len >= sizeof addr.sun_path) {
        fputs("qrexec-client: socket path too long\n", stderr);
        return 1;
    }

    signal(SIGPIPE, SIG_IGN);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        fprintf(stderr, "qrexec-client: cannot connect to the qube's agent: %s\n",
                strerror(errno));
        return 1;
    }
    if (send_frame(sock, REQUEST, (const unsigned char *)command, (uint32_t)command_len) < 0)
        goto broken;

    struct pollfd fds[2] = {{.fd = sock, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    int input_open = 1;
    for (;;) {
        if (poll(fds, input_open ? 2 : 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            goto broken;
        }
        if (input_open && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) {
            ssize_t got = read(0, buf, MAX_DATA);
            if (got < 0 && errno == EINTR)
                continue;
            if (got <= 0) {
                input_open = 0;
                if (send_frame(sock, STDIN_F, NULL, 0) < 0)
                    input_open = 0; /* the call may have ended: read its answer */
            } else if (send_frame(sock, STDIN_F, buf, (uint32_t)got) < 0) {
                input_open = 0;
            }
        }
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            unsigned char header[5];
            int r = read_exact(sock, header, sizeof header);
            if (r != 0)
                goto broken;
            uint32_t size = ((uint32_t)header[1] << 24) | ((uint32_t)header[2] << 16) |
                            ((uint32_t)header[3] << 8) | header[4];
            if (size > MAX_DATA || (size && read_exact(sock, buf, size) != 0))
                goto broken;
            if (header[0] == STDOUT_F) {
                write_all(1, buf, size);
            } else if (header[0] == STDERR_F) {
                write_all(2, buf, size);
            } else if (header[0] == EXIT_F && size == 4) {
                uint32_t code = ((uint32_t)buf[0] << 24) | ((uint32_t)buf[1] << 16) |
                                ((uint32_t)buf[2] << 8) | buf[3];
                return (int)(int32_t)code & 0xff;
            } else {
                goto broken;
            }
        }
    }
broken:
    fputs("qrexec-client: the call broke\n", stderr);
    return 1;
}
