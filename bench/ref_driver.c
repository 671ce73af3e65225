/* The boss's side of the exchange in C, loaded by bench/run.py with ctypes.
 *
 * Speaks protocol v1 on a channel fd to any helper (privsock-helper or
 * ref_helper) and times each exchange with CLOCK_MONOTONIC, so a C-to-C run is
 * the physical limit and a C-to-privsock run is the helper's cost alone.
 * Also: socket+bind+close in-process, the floor for any design.
 *
 * Built at bench time: gcc -O2 -shared -fPIC -o bench/build/libref_driver.so bench/ref_driver.c
 * Every function returns 0, or a negative number naming what went wrong:
 * -errno for a failed system call, -10000 - status for a reply that was not OK,
 * -20000 for a reply without exactly one fd, -30000 for a short reply.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { REQUEST_SIZE = 32, REPLY_SIZE = 16 };

static uint32_t next_id = 1;
unsigned char last_reply[REPLY_SIZE]; /* the last reply read, for error messages */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* transport 1 UDP / 2 TCP, family 4 / 6; the loopback address of that family. */
static void encode(unsigned char *req, int transport, int family, int port)
{
    uint32_t id = next_id++;
    memset(req, 0, REQUEST_SIZE);
    req[0] = 'P'; req[1] = 'S'; req[2] = 1; req[3] = 1;
    req[4] = id >> 24; req[5] = id >> 16; req[6] = id >> 8; req[7] = id;
    req[8] = transport; req[9] = family;
    req[10] = port >> 8; req[11] = port;
    if (family == 4) {
        req[12] = 127; req[15] = 1;
    } else {
        req[27] = 1;
    }
}

static int send_request(int chan, int transport, int family, int port)
{
    unsigned char req[REQUEST_SIZE];
    encode(req, transport, family, port);
    return send(chan, req, sizeof req, MSG_NOSIGNAL) == REQUEST_SIZE ? 0 : -errno;
}

/* Read one reply; on OK with one fd, close the fd. */
static int take_reply(int chan)
{
    unsigned char rep[REPLY_SIZE + 1];
    union { struct cmsghdr align; char buf[CMSG_SPACE(4 * sizeof(int))]; } u;
    struct iovec iov = {rep, sizeof rep};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    ssize_t n = recvmsg(chan, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0)
        return -errno;
    if (n != REPLY_SIZE)
        return -30000;
    memcpy(last_reply, rep, REPLY_SIZE);
    int fds = 0, fd = -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (int i = 0; i < count; i++) {
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                close(fd);
                fds++;
            }
        }
    }
    if (rep[3] != 0)
        return -10000 - rep[3];
    return fds == 1 ? 0 : -20000;
}

/* n round trips, one at a time; ns[i] is the time of the i-th. */
int round_trips(int chan, int n, int transport, int family, int port, int64_t *ns)
{
    for (int i = 0; i < n; i++) {
        int64_t t0 = now_ns();
        int rc = send_request(chan, transport, family, port);
        if (rc == 0)
            rc = take_reply(chan);
        ns[i] = now_ns() - t0;
        if (rc)
            return rc;
    }
    return 0;
}

/* n requests with up to `depth` in flight: send `depth`, then send one for
 * each reply read. *total_ns is the time from the first send to the last reply.
 * Every request binds a different port (port, port+1, ...) so that sockets
 * alive at the same time never collide. */
int pipelined(int chan, int n, int depth, int transport, int family, int port, int64_t *total_ns)
{
    int sent = 0, done = 0, rc = 0;
    int64_t t0 = now_ns();
    while (done < n) {
        while (sent < n && sent - done < depth) {
            if ((rc = send_request(chan, transport, family, port + sent % depth)))
                return rc;
            sent++;
        }
        if ((rc = take_reply(chan)))
            return rc;
        done++;
    }
    *total_ns = now_ns() - t0;
    return 0;
}

/* socket + bind + close in this process, n times (needs the privilege itself). */
int in_process(int n, int transport, int family, int port, int64_t *ns)
{
    int type = transport == 1 ? SOCK_DGRAM : SOCK_STREAM;
    for (int i = 0; i < n; i++) {
        int64_t t0 = now_ns();
        int fd = socket(family == 6 ? AF_INET6 : AF_INET, type | SOCK_CLOEXEC, 0), rc;
        if (fd < 0)
            return -errno;
        if (family == 6) {
            int off = 0;
            struct sockaddr_in6 sa = {.sin6_family = AF_INET6, .sin6_port = htons(port),
                                      .sin6_addr = IN6ADDR_LOOPBACK_INIT};
            rc = setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off)
                 || bind(fd, (struct sockaddr *)&sa, sizeof sa);
        } else {
            struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port),
                                     .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
            rc = bind(fd, (struct sockaddr *)&sa, sizeof sa);
        }
        int err = errno;
        close(fd);
        ns[i] = now_ns() - t0;
        if (rc)
            return -err;
    }
    return 0;
}
