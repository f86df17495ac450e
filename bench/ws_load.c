/*
 * ws_load: holds N WebSocket connections to the order-notifier, spread over U users, commits
 * order updates from a writer thread, and measures commit-to-receive latency per delivery.
 *
 *   DATABASE_URL=... JWT_SECRET=... ws_load [-u ws://127.0.0.1:8081/ws/orders] [-n 1000]
 *       [-U 100] [-e 500] [-r 200] [-c PG_CHANNEL]
 *
 * -n connections, -U users, -e events to commit, -r events per second, -c the channel the
 * notifier LISTENs on (the writer session sets markets.order_channel to it). Every event goes
 * to the n/U connections of its user, so e * n/U deliveries are expected. Latency is from just
 * before the UPDATE is sent to the frame's arrival; the order's filled_quantity carries the
 * event's sequence number.
 *
 * One libuv loop for the sockets (wslay client contexts); the writer uses blocking libpq in its
 * own thread so the loop never waits on Postgres.
 *
 * With -e 0 there is no writer: something else commits (bench/run uses pgbench) and each
 * update's latency is taken from the order's updated_at, which the committing statement sets to
 * clock_timestamp(), to the frame's arrival (CLOCK_REALTIME; one box, one clock). The clients
 * stay connected until SIGTERM/SIGINT; "READY conns=N failed=F" is printed once all are in, and
 * each SIGUSR1 prints one line "STATS received=... p50_us=... p99_us=... p999_us=... max_us=...
 * closed=..." for the deliveries since the previous SIGUSR1 and starts a new period. In both
 * modes at most -k connection attempts (default 256) are in flight at once, so 10,000 clients
 * do not overflow the notifier's accept backlog.
 */
#include "jwt.h"

#include "cm/alloc.h"

#include <cjson/cJSON.h>
#include <libpq-fe.h>
#include <llhttp.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>
#include <wslay/wslay.h>

typedef struct conn {
    uv_tcp_t tcp;
    uv_connect_t connect_req;
    wslay_event_context_ptr ctx;
    int user;
    int upgraded;
    llhttp_t parser; /* the 101 response */
    const char *in;
    size_t in_len;
} conn_t;

static struct {
    const char *host;
    int port;
    char path[256];
    const char *secret;
    const char *dsn;
    const char *channel;
    int conns, users, events, rate;
} opt = {"127.0.0.1", 8081, "/ws/orders", NULL, NULL, NULL, 1000, 100, 500, 200};

static uv_loop_t *loop;
static conn_t *conns;
static int connected, welcomed, failed;
static _Atomic uint64_t *sent_ns; /* per event sequence number: when the UPDATE was sent */
static double *lat;               /* seconds, per delivery */
static size_t nlat, expected;
static uint64_t t_connect_start;
static uv_timer_t tick;
static atomic_int writer_done, writer_failed;
static llhttp_settings_t http_settings;
static int started, max_pending = 256;

/* External-writer mode (-e 0): a latency histogram in microseconds, reset by SIGUSR1. */
#define HIST_MAX_US 2000000
static uint32_t *hist; /* HIST_MAX_US + 1 buckets, the last one for "longer" */
static uint64_t hist_n, hist_max_us, hist_closed;
static uv_signal_t sig_usr1, sig_term, sig_int;
static void start_next(void);

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- writer thread -------------------------------------------------------------------- */

static void *writer(void *arg)
{
    (void)arg;
    PGconn *pg = PQconnectdb(opt.dsn);
    if (PQstatus(pg) != CONNECTION_OK) {
        fprintf(stderr, "ws_load: postgres: %s", PQerrorMessage(pg));
        PQfinish(pg);
        atomic_store(&writer_failed, 1);
        atomic_store(&writer_done, 1);
        return NULL;
    }
    const char *p1[1] = {opt.channel};
    PQclear(PQexecParams(pg, "SELECT set_config('markets.order_channel', $1, false)", 1, NULL, p1,
                         NULL, NULL, 0));
    long long *orders = cm_calloc((size_t)opt.users, sizeof *orders);
    if (!orders) {
        PQfinish(pg);
        atomic_store(&writer_failed, 1);
        atomic_store(&writer_done, 1);
        return NULL;
    }
    for (int u = 0; u < opt.users; u++) {
        char user[32];
        snprintf(user, sizeof user, "load-u%d", u);
        const char *p[1] = {user};
        PGresult *r = PQexecParams(pg,
                                   "INSERT INTO orders (user_id, market, side, price, quantity) "
                                   "VALUES ($1, 'BTC-USD', 'buy', 1, 1000000) RETURNING id",
                                   1, NULL, p, NULL, NULL, 0);
        orders[u] = PQresultStatus(r) == PGRES_TUPLES_OK ? atoll(PQgetvalue(r, 0, 0)) : 0;
        PQclear(r);
    }
    usleep(300000); /* let the creation events drain */
    uint64_t gap = 1000000000ull / (uint64_t)opt.rate, next = now_ns();
    for (int i = 0; i < opt.events; i++) {
        char seq[16], id[24];
        snprintf(seq, sizeof seq, "%d", i);
        snprintf(id, sizeof id, "%lld", orders[i % opt.users]);
        const char *p[2] = {seq, id};
        atomic_store(&sent_ns[i], now_ns());
        PQclear(PQexecParams(pg, "UPDATE orders SET filled_quantity = $1 WHERE id = $2", 2, NULL, p,
                             NULL, NULL, 0));
        next += gap;
        uint64_t t = now_ns();
        if (next > t)
            usleep((useconds_t)((next - t) / 1000));
    }
    cm_free(orders);
    PQfinish(pg);
    atomic_store(&writer_done, 1);
    return NULL;
}

/* ---- WebSocket client ------------------------------------------------------------------ */

static void on_write(uv_write_t *req, int status)
{
    (void)status;
    cm_free(req);
}

static int send_raw(conn_t *c, const void *data, size_t len)
{
    uv_write_t *req = cm_malloc(sizeof *req + len);
    if (!req)
        return UV_ENOMEM;
    memcpy(req + 1, data, len);
    uv_buf_t b = uv_buf_init((char *)(req + 1), (unsigned)len);
    int rc = uv_write(req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (rc)
        cm_free(req);
    return rc;
}

static ssize_t ws_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags, void *ud)
{
    (void)flags;
    conn_t *c = ud;
    if (!c->in_len) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    size_t n = len < c->in_len ? len : c->in_len;
    memcpy(buf, c->in, n);
    c->in += n;
    c->in_len -= n;
    return (ssize_t)n;
}

static ssize_t ws_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                       void *ud)
{
    (void)flags;
    if (send_raw(ud, data, len)) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return (ssize_t)len;
}

static int ws_genmask(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *ud)
{
    (void)ctx;
    (void)ud;
    return RAND_bytes(buf, (int)len) == 1 ? 0 : -1;
}

/* Microseconds from `iso` ("2026-11-29T20:00:00.123456Z", UTC) to now (CLOCK_REALTIME); -1
 * when it does not parse. */
static int64_t age_us(const char *iso)
{
    struct tm tm = {0};
    char frac[8] = "0";
    if (sscanf(iso, "%4d-%2d-%2dT%2d:%2d:%2d.%6[0-9]", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
               &tm.tm_hour, &tm.tm_min, &tm.tm_sec, frac) < 6)
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    long micros = strtol(frac, NULL, 10);
    for (size_t k = strlen(frac); k < 6; k++)
        micros *= 10;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    int64_t at = (int64_t)timegm(&tm) * 1000000 + micros;
    int64_t d = (int64_t)now.tv_sec * 1000000 + now.tv_nsec / 1000 - at;
    return d < 0 ? 0 : d;
}

static void ws_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                   void *ud)
{
    (void)ctx;
    (void)ud;
    uint64_t t = now_ns();
    if (arg->opcode != WSLAY_TEXT_FRAME)
        return;
    cJSON *j = cJSON_ParseWithLength((const char *)arg->msg, arg->msg_length);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(j, "type");
    if (cJSON_IsString(type) && strcmp(type->valuestring, "welcome") == 0) {
        if (++welcomed == opt.conns)
            fprintf(stderr, "ws_load: %d connections welcomed in %.2f s\n", welcomed,
                    (double)(t - t_connect_start) / 1e9);
        start_next();
    } else if (hist && cJSON_IsString(type) && strcmp(type->valuestring, "order_update") == 0) {
        const cJSON *order = cJSON_GetObjectItemCaseSensitive(j, "order");
        const cJSON *at = cJSON_GetObjectItemCaseSensitive(order, "updated_at");
        int64_t us = cJSON_IsString(at) ? age_us(at->valuestring) : -1;
        if (us >= 0) {
            hist[us < HIST_MAX_US ? us : HIST_MAX_US]++;
            hist_n++;
            if ((uint64_t)us > hist_max_us)
                hist_max_us = (uint64_t)us;
        }
    } else if (cJSON_IsString(type) && strcmp(type->valuestring, "order_update") == 0) {
        const cJSON *order = cJSON_GetObjectItemCaseSensitive(j, "order");
        const cJSON *fq = cJSON_GetObjectItemCaseSensitive(order, "filled_quantity");
        if (cJSON_IsString(fq)) {
            long seq = strtol(fq->valuestring, NULL, 10);
            if (seq >= 0 && seq < opt.events && nlat < expected) {
                uint64_t s = atomic_load(&sent_ns[seq]);
                if (s)
                    lat[nlat++] = (double)(t - s) / 1e9;
            }
        }
    }
    cJSON_Delete(j);
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    static char slab[65536];
    (void)suggested;
    *buf = uv_buf_init(slab, sizeof slab);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    conn_t *c = s->data;
    if (n < 0) {
        if (c->upgraded && welcomed == opt.conns)
            hist_closed++;
        else
            failed++;
        uv_close((uv_handle_t *)s, NULL);
        if (!c->upgraded)
            start_next();
        return;
    }
    const char *data = buf->base;
    size_t len = (size_t)n;
    if (!c->upgraded) {
        /* llhttp stops after the response head (on_headers_complete returns 2); what follows
         * it in this read is already WebSocket. */
        llhttp_errno_t e = llhttp_execute(&c->parser, data, len);
        if (e == HPE_OK)
            return; /* the head is not complete yet */
        int code = llhttp_get_status_code(&c->parser);
        if (e != HPE_PAUSED_UPGRADE || code != 101) {
            fprintf(stderr, "ws_load: upgrade refused: status %d (%s)\n", code,
                    llhttp_errno_name(e));
            failed++;
            uv_close((uv_handle_t *)s, NULL);
            start_next();
            return;
        }
        c->upgraded = 1;
        size_t used = (size_t)(llhttp_get_error_pos(&c->parser) - data);
        data += used;
        len -= used;
    }
    c->in = data;
    c->in_len = len;
    wslay_event_recv(c->ctx);
    if (wslay_event_want_write(c->ctx))
        wslay_event_send(c->ctx);
}

/* The response head is all we need from HTTP: no body, and llhttp_execute() returns
 * HPE_PAUSED_UPGRADE right after it (whatever the status; on_read checks it). */
static int on_head_done(llhttp_t *p)
{
    (void)p;
    return 2;
}

static void on_connect(uv_connect_t *req, int status)
{
    conn_t *c = req->data;
    if (status) {
        fprintf(stderr, "ws_load: connect: %s\n", uv_strerror(status));
        failed++;
        uv_close((uv_handle_t *)&c->tcp, NULL);
        start_next();
        return;
    }
    connected++;
    char user[32];
    snprintf(user, sizeof user, "load-u%d", c->user);
    char *tok = on_jwt_sign(user, (int64_t)time(NULL) + 3600, NULL, opt.secret, strlen(opt.secret));
    unsigned char key_raw[16];
    char key[32];
    RAND_bytes(key_raw, sizeof key_raw);
    EVP_EncodeBlock((unsigned char *)key, key_raw, sizeof key_raw);
    char req_text[2048];
    int n = snprintf(req_text, sizeof req_text,
                     "GET %s?access_token=%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: %s\r\n\r\n",
                     opt.path, tok, opt.host, key);
    cm_free(tok);
    llhttp_init(&c->parser, HTTP_RESPONSE, &http_settings);
    if (send_raw(c, req_text, (size_t)n) != 0 ||
        uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_read) != 0) {
        failed++;
        uv_close((uv_handle_t *)&c->tcp, NULL);
        start_next();
    }
}

/* The latency at quantile q of the current period, in microseconds. */
static uint64_t hist_quantile(double q)
{
    uint64_t rank = (uint64_t)(q * (double)hist_n), seen = 0;
    for (uint64_t us = 0; us <= HIST_MAX_US; us++) {
        seen += hist[us];
        if (seen > rank)
            return us;
    }
    return HIST_MAX_US;
}

static void on_usr1(uv_signal_t *h, int signum)
{
    (void)h;
    (void)signum;
    printf("STATS received=%llu p50_us=%llu p99_us=%llu p999_us=%llu max_us=%llu closed=%llu\n",
           (unsigned long long)hist_n, (unsigned long long)(hist_n ? hist_quantile(0.5) : 0),
           (unsigned long long)(hist_n ? hist_quantile(0.99) : 0),
           (unsigned long long)(hist_n ? hist_quantile(0.999) : 0), (unsigned long long)hist_max_us,
           (unsigned long long)hist_closed);
    fflush(stdout);
    memset(hist, 0, (HIST_MAX_US + 1) * sizeof *hist);
    hist_n = hist_max_us = 0;
}

static void on_stop(uv_signal_t *h, int signum)
{
    (void)h;
    (void)signum;
    for (int i = 0; i < started; i++)
        if (!uv_is_closing((uv_handle_t *)&conns[i].tcp))
            uv_close((uv_handle_t *)&conns[i].tcp, NULL);
    uv_close((uv_handle_t *)&sig_usr1, NULL);
    uv_close((uv_handle_t *)&sig_term, NULL);
    uv_close((uv_handle_t *)&sig_int, NULL);
}

/* Starts connection attempts while fewer than max_pending are between connect and welcome. */
static void start_next(void)
{
    static struct sockaddr_in addr;
    if (!started)
        uv_ip4_addr(opt.host, opt.port, &addr);
    while (started < opt.conns && started - welcomed - failed < max_pending) {
        conn_t *c = &conns[started++];
        uv_tcp_init(loop, &c->tcp);
        c->tcp.data = c;
        c->connect_req.data = c;
        uv_tcp_connect(&c->connect_req, &c->tcp, (const struct sockaddr *)&addr, on_connect);
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void on_tick(uv_timer_t *t)
{
    static uint64_t done_at;
    if (atomic_load(&writer_done) && !done_at)
        done_at = uv_now(loop);
    if (nlat < expected && (!done_at || uv_now(loop) - done_at < 5000))
        return;
    uv_timer_stop(t);
    qsort(lat, nlat, sizeof *lat, cmp_double);
    printf("ws_load: %d connections over %d users, %d events at %d/s: %zu of %zu deliveries\n",
           opt.conns, opt.users, opt.events, opt.rate, nlat, expected);
    if (nlat)
        printf("commit-to-receive: p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms\n",
               lat[nlat / 2] * 1e3, lat[nlat * 9 / 10] * 1e3, lat[nlat * 99 / 100] * 1e3,
               lat[nlat - 1] * 1e3);
    for (int i = 0; i < opt.conns; i++)
        if (!uv_is_closing((uv_handle_t *)&conns[i].tcp))
            uv_close((uv_handle_t *)&conns[i].tcp, NULL);
    uv_close((uv_handle_t *)t, NULL);
}

int main(int argc, char **argv)
{
    const char *url = "ws://127.0.0.1:8081/ws/orders";
    int ch;
    opt.channel = getenv("PG_CHANNEL") ? getenv("PG_CHANNEL") : "order_events";
    while ((ch = getopt(argc, argv, "u:n:U:e:r:c:k:h")) != -1) {
        switch (ch) {
        case 'u':
            url = optarg;
            break;
        case 'n':
            opt.conns = atoi(optarg);
            break;
        case 'U':
            opt.users = atoi(optarg);
            break;
        case 'e':
            opt.events = atoi(optarg);
            break;
        case 'r':
            opt.rate = atoi(optarg);
            break;
        case 'c':
            opt.channel = optarg;
            break;
        case 'k':
            max_pending = atoi(optarg);
            break;
        default:
            fprintf(stderr, "usage: ws_load [-u url] [-n conns] [-U users] [-e events] [-r rate]"
                            " [-c channel] [-k pending-connects]   (DATABASE_URL, JWT_SECRET"
                            " from the environment; -e 0: external writer, see ws_load.c)\n");
            return 2;
        }
    }
    static char host[128];
    if (sscanf(url, "ws://%127[^:/]:%d%255s", host, &opt.port, opt.path) < 2) {
        fprintf(stderr, "ws_load: expected ws://host:port/path\n");
        return 2;
    }
    opt.host = host;
    opt.dsn = getenv("DATABASE_URL");
    opt.secret =
        getenv("JWT_SECRET") ? getenv("JWT_SECRET") : "dev-only-order-notifier-secret-change-me";
    if ((!opt.dsn && opt.events > 0) || opt.conns < 1 || opt.users < 1 || opt.users > opt.conns ||
        opt.events < 0 || opt.rate < 1 || max_pending < 1) {
        fprintf(stderr, "ws_load: DATABASE_URL required; 1 <= users <= conns\n");
        return 2;
    }
    loop = uv_default_loop();
    llhttp_settings_init(&http_settings);
    http_settings.on_headers_complete = on_head_done;
    /* Connection i belongs to user i % U: each event goes to the connections of one user. */
    for (int e = 0; e < opt.events; e++)
        for (int i = e % opt.users; i < opt.conns; i += opt.users)
            expected++;
    conns = cm_calloc((size_t)opt.conns, sizeof *conns);
    sent_ns = cm_calloc((size_t)opt.events + 1, sizeof *sent_ns);
    lat = cm_calloc(expected + 1, sizeof *lat);
    if (opt.events == 0)
        hist = cm_calloc(HIST_MAX_US + 1, sizeof *hist);
    if (!conns || !sent_ns || !lat || (opt.events == 0 && !hist)) {
        fprintf(stderr, "ws_load: out of memory\n");
        cm_free(conns);
        cm_free((void *)sent_ns);
        cm_free(lat);
        cm_free(hist);
        return 1;
    }
    t_connect_start = now_ns();
    for (int i = 0; i < opt.conns; i++) {
        conn_t *c = &conns[i];
        c->user = i % opt.users;
        struct wslay_event_callbacks cbs = {ws_recv, ws_send, ws_genmask, NULL, NULL, NULL, ws_msg};
        wslay_event_context_client_init(&c->ctx, &cbs, c);
    }
    start_next();
    /* Start writing once everyone is in. */
    while (welcomed + failed < opt.conns)
        uv_run(loop, UV_RUN_ONCE);
    if (opt.events == 0) {
        printf("READY conns=%d failed=%d\n", welcomed, failed);
        fflush(stdout);
        uv_signal_init(loop, &sig_usr1);
        uv_signal_start(&sig_usr1, on_usr1, SIGUSR1);
        uv_signal_init(loop, &sig_term);
        uv_signal_start(&sig_term, on_stop, SIGTERM);
        uv_signal_init(loop, &sig_int);
        uv_signal_start(&sig_int, on_stop, SIGINT);
        uv_run(loop, UV_RUN_DEFAULT);
        for (int i = 0; i < opt.conns; i++)
            wslay_event_context_free(conns[i].ctx);
        cm_free(conns);
        cm_free(hist);
        cm_free(lat);
        cm_free((void *)sent_ns);
        return uv_loop_close(loop) == 0 ? 0 : 1;
    }
    pthread_t th;
    pthread_create(&th, NULL, writer, NULL);
    uv_timer_init(loop, &tick);
    uv_timer_start(&tick, on_tick, 50, 50);
    uv_run(loop, UV_RUN_DEFAULT);
    pthread_join(th, NULL);
    for (int i = 0; i < opt.conns; i++)
        wslay_event_context_free(conns[i].ctx);
    cm_free(conns);
    cm_free(lat);
    cm_free((void *)sent_ns);
    uv_loop_close(loop);
    return failed || atomic_load(&writer_failed) ? 1 : 0;
}
