/* fuzz/fuzz_common.c: the loopback exchange and helpers of fuzz.h. */
#include "fuzz.h"

#include "cm/log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

uint64_t fuzz_hash(const uint8_t *data, size_t size)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < size; i++)
        h = (h ^ data[i]) * 1099511628211ull;
    return h;
}

void fuzz_quiet_logs(void)
{
    static FILE *devnull;
    if (!devnull)
        devnull = fopen("/dev/null", "w");
    cm_log_init("fuzz", CM_LOG_DEBUG, CM_LOG_JSON);
    if (devnull)
        cm_log_set_stream(devnull);
    else
        cm_log_set_level(CM_LOG_ERROR);
}

/* The client side of one exchange. */
typedef struct client {
    int fd;
    uv_poll_t poll;
    int polling;
    int eof; /* the server's FIN or RST has been read */
    int closed;
} client_t;

static void drain(client_t *cl)
{
    char buf[16384];
    for (;;) {
        ssize_t n = recv(cl->fd, buf, sizeof buf, 0);
        if (n > 0)
            continue;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        cl->eof = 1; /* 0: FIN; any other error (ECONNRESET): the server is gone too */
        if (cl->polling) {
            uv_poll_stop(&cl->poll);
            cl->polling = 0;
        }
        return;
    }
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    (void)status;
    (void)events;
    drain(p->data);
}

static void on_poll_close(uv_handle_t *h)
{
    client_t *cl = h->data;
    cl->closed = 1;
}

static void on_tick(uv_timer_t *t)
{
    (void)t; /* only makes uv_run(UV_RUN_ONCE) return so the deadline is looked at */
}

/* Writes all of `p` (the socket is non-blocking: when the kernel's buffer is full, the loop
 * runs so the server reads). */
static void send_all(uv_loop_t *loop, client_t *cl, const uint8_t *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(cl->fd, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            uv_run(loop, UV_RUN_ONCE);
            continue;
        }
        return; /* the server closed on us (EPIPE, ECONNRESET): what it read is what counts */
    }
}

void fuzz_exchange(uv_loop_t *loop, cm_http_server_t *srv, int port, const void *prefix,
                   size_t plen, const uint8_t *data, size_t size, uint64_t seed)
{
    client_t cl = {0};
    cl.fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    FUZZ_CHECK(cl.fd >= 0);
    int one = 1;
    setsockopt(cl.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int rc;
    do {
        rc = connect(cl.fd, (struct sockaddr *)&sa, sizeof sa);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
        fprintf(stderr, "fuzz: connect to 127.0.0.1:%d: %s\n", port, strerror(errno));
        abort();
    }
    fcntl(cl.fd, F_SETFL, fcntl(cl.fd, F_GETFL) | O_NONBLOCK);
    FUZZ_CHECK(uv_poll_init(loop, &cl.poll, cl.fd) == 0);
    cl.poll.data = &cl;
    uv_poll_start(&cl.poll, UV_READABLE, on_poll);
    cl.polling = 1;

    /* How the bytes are cut: one write (a quarter of the inputs), else pieces of 1..64 bytes
     * (at most 64 of them), with loop turns in between so that the server reads them one by
     * one. The prefix goes alone, or with the start of `data` in the same write. */
    size_t piece = size ? size : 1;
    if ((seed & 3) != 0) {
        piece = 1 + (size_t)((seed >> 2) % 64);
        if (piece < size / 64)
            piece = size / 64;
    }
    int prefix_alone = plen && ((seed >> 12) & 1);
    if (prefix_alone) {
        send_all(loop, &cl, prefix, plen);
        for (int i = 0; i < 3; i++)
            uv_run(loop, UV_RUN_NOWAIT);
    } else if (plen) {
        send_all(loop, &cl, prefix, plen);
    }
    for (size_t off = 0; off < size;) {
        size_t n = size - off < piece ? size - off : piece;
        send_all(loop, &cl, data + off, n);
        off += n;
        if (off < size && piece < size) {
            for (int i = 0; i < 2; i++)
                uv_run(loop, UV_RUN_NOWAIT);
        }
    }
    shutdown(cl.fd, SHUT_WR);

    uv_timer_t tick;
    uv_timer_init(loop, &tick);
    uv_timer_start(&tick, on_tick, 100, 100);
    uint64_t deadline = uv_hrtime() + 5000000000ull;
    while (!cl.eof || cm_http_server_connections(srv) > 0) {
        uv_run(loop, UV_RUN_ONCE);
        if (!cl.eof)
            drain(&cl);
        if (uv_hrtime() > deadline) {
            fprintf(stderr,
                    "fuzz: the server kept the connection 5 s after the client's FIN "
                    "(eof seen %d, connections %zu)\n",
                    cl.eof, cm_http_server_connections(srv));
            abort();
        }
    }
    uv_timer_stop(&tick);
    uv_close((uv_handle_t *)&tick, NULL);
    if (cl.polling)
        uv_poll_stop(&cl.poll);
    cl.poll.data = &cl;
    uv_close((uv_handle_t *)&cl.poll, on_poll_close);
    while (!cl.closed)
        uv_run(loop, UV_RUN_ONCE);
    uv_run(loop, UV_RUN_NOWAIT); /* the timer's close */
    close(cl.fd);
}
