/* The physical limit: the privsock exchange in plain C, nothing else.
 *
 * Serves protocol v1 on fd 0 (AF_UNIX SOCK_SEQPACKET) like privsock-helper:
 * a 32-byte request in, socket + setsockopt + bind, a 16-byte reply out with
 * the new fd in SCM_RIGHTS, close our copy. No policy, no rate limit, no audit
 * log, no hardening: it measures what the kernel and the exchange cost, which
 * no helper can beat. It checks the request only as far as it needs to act.
 *
 * Built at bench time: gcc -O2 -o bench/build/ref_helper bench/ref_helper.c
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

enum { REQUEST_SIZE = 32, REPLY_SIZE = 16 };
enum { OP_CREATE = 1, OP_PING = 2 };
enum { ST_OK = 0, ST_MALFORMED = 3, ST_OS_ERROR = 4 };
enum { STAGE_SOCKET = 1, STAGE_SETSOCKOPT = 2, STAGE_BIND = 3 };
enum { OPT_REUSEADDR = 1, OPT_REUSEPORT = 2, OPT_V6ONLY = 4 };

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static int reply(const unsigned char *req, int status, uint32_t detail, int code, int fd)
{
    unsigned char out[REPLY_SIZE] = {'P', 'S', 1, (unsigned char)status};
    memcpy(out + 4, req + 4, 4);
    put32(out + 8, detail);
    out[12] = (unsigned char)code;
    struct iovec iov = {out, sizeof out};
    union { struct cmsghdr align; char buf[CMSG_SPACE(sizeof(int))]; } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        msg.msg_control = u.buf;
        msg.msg_controllen = sizeof u.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    return sendmsg(0, &msg, MSG_NOSIGNAL) == REPLY_SIZE ? 0 : -1;
}

static int create(const unsigned char *req)
{
    int v6 = req[9] == 6, options = req[28] << 8 | req[29];
    int type = req[8] == 1 ? SOCK_DGRAM : SOCK_STREAM;
    int fd = socket(v6 ? AF_INET6 : AF_INET, type | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return reply(req, ST_OS_ERROR, errno, STAGE_SOCKET, -1);
    int one = 1, v6only = !!(options & OPT_V6ONLY);
    if ((options & OPT_REUSEADDR && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one))
        || (options & OPT_REUSEPORT && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one))
        || (v6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only))) {
        int err = errno;
        close(fd);
        return reply(req, ST_OS_ERROR, err, STAGE_SETSOCKOPT, -1);
    }
    int port = req[10] << 8 | req[11], rc;
    if (v6) {
        struct sockaddr_in6 sa = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
        memcpy(&sa.sin6_addr, req + 12, 16);
        rc = bind(fd, (struct sockaddr *)&sa, sizeof sa);
    } else {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
        memcpy(&sa.sin_addr, req + 12, 4);
        rc = bind(fd, (struct sockaddr *)&sa, sizeof sa);
    }
    if (rc) {
        int err = errno;
        close(fd);
        return reply(req, ST_OS_ERROR, err, STAGE_BIND, -1);
    }
    rc = reply(req, ST_OK, 0, 0, fd);
    close(fd);
    return rc;
}

int main(void)
{
    unsigned char req[REQUEST_SIZE + 1];
    for (;;) {
        ssize_t n = recv(0, req, sizeof req, 0);
        if (n <= 0)
            return n == 0 ? 0 : 1;
        int ok = n == REQUEST_SIZE && req[0] == 'P' && req[1] == 'S' && req[2] == 1;
        int rc;
        if (ok && req[3] == OP_PING)
            rc = reply(req, ST_OK, 0, 0, -1);
        else if (ok && req[3] == OP_CREATE && (req[9] == 4 || req[9] == 6))
            rc = create(req);
        else
            rc = reply(req, ST_MALFORMED, 0, 0, -1);
        if (rc)
            return 1;
    }
}
