/*
 * ws.h: the server side of RFC 6455 for one connection, on top of wslay's event API.
 *
 * The session is transport-agnostic: bytes read from the socket are pushed in with
 * on_ws_feed(), and the frames to send leave through the `write` callback, which must copy or
 * queue them without blocking (a libuv write queue). Modelled on h2o's lib/websocket.c: wslay's
 * recv callback answers WSLAY_ERR_WOULDBLOCK once the fed bytes are consumed.
 *
 * wslay enforces the protocol: unmasked client frames and bad framing close with 1002, invalid
 * UTF-8 in text with 1007, messages over the limit with 1009; pings are answered, fragmented
 * messages reassembled, control frames may interleave.
 */
#ifndef ON_WS_H
#define ON_WS_H

#include <stddef.h>
#include <stdint.h>

/* Length of a Sec-WebSocket-Accept value (base64 of a SHA-1) plus its NUL. */
#define ON_WS_ACCEPT_LEN 29

/* Close codes of RFC 6455 §7.4.1 that the notifier sends. */
enum {
    ON_WS_CLOSE_NORMAL = 1000,
    ON_WS_CLOSE_GOING_AWAY = 1001,
    ON_WS_CLOSE_PROTOCOL = 1002,
    ON_WS_CLOSE_INVALID_DATA = 1007,
    ON_WS_CLOSE_POLICY = 1008,
    ON_WS_CLOSE_TOO_BIG = 1009,
    ON_WS_CLOSE_INTERNAL = 1011,
    ON_WS_CLOSE_TRY_AGAIN = 1013,
};

/*
 * Computes Sec-WebSocket-Accept for the client's Sec-WebSocket-Key (`key`, `len` bytes,
 * borrowed) per RFC 6455 §4.2.2: base64(SHA-1(key + GUID)). `out` receives a NUL-terminated
 * string of ON_WS_ACCEPT_LEN bytes. Returns 0, or UV_EINVAL when the key is not the base64
 * of 16 bytes (§4.1).
 */
int on_ws_accept_key(const char *key, size_t len, char out[ON_WS_ACCEPT_LEN]);

typedef struct on_ws on_ws_t;

typedef struct on_ws_callbacks {
    /* A complete text message (UTF-8 already checked by wslay); `data` is borrowed. */
    void (*on_text)(on_ws_t *ws, const char *data, size_t len, void *ud);
    /* Any frame or message arrived from the peer (liveness, for the idle timeout). */
    void (*on_activity)(on_ws_t *ws, void *ud);
    /*
     * Sends `len` bytes (borrowed: copy them) to the peer. Returns 0 or a negative UV_E*
     * code, which fails the session.
     */
    int (*write)(on_ws_t *ws, const uint8_t *data, size_t len, void *ud);
} on_ws_callbacks_t;

/*
 * Creates a server-side session. `cbs` is copied; `ud` is passed to every callback.
 * `max_msg` (bytes) is the largest client message accepted (larger: close 1009).
 * Returns 0 and *out (caller frees with on_ws_free), or UV_ENOMEM.
 */
int on_ws_new(const on_ws_callbacks_t *cbs, void *ud, size_t max_msg, on_ws_t **out);
/* Releases the session (not the transport). NULL is a no-op. */
void on_ws_free(on_ws_t *ws);

/*
 * Processes `len` bytes (borrowed) read from the peer: runs callbacks, queues pongs and close
 * replies, and flushes output through `write`. Returns 0, or a negative code when the session
 * failed and the transport should be closed at once.
 */
int on_ws_feed(on_ws_t *ws, const uint8_t *data, size_t len);

/* Queues and flushes a text message (`data` copied). Returns 0, UV_EPIPE after a close, or
 * UV_ENOMEM. */
int on_ws_send_text(on_ws_t *ws, const char *data, size_t len);
/* Queues and flushes a protocol ping. Returns 0 or a negative code. */
int on_ws_send_ping(on_ws_t *ws);
/*
 * Starts the closing handshake with `code` (RFC 6455 §7.4) and stops reading: later input is
 * ignored. Returns 0 or a negative code; a second call is a no-op.
 */
int on_ws_close(on_ws_t *ws, uint16_t code);

/* Non-zero once the session has nothing more to do (close sent, or a fatal error): the
 * transport may be closed after its pending writes. */
int on_ws_finished(const on_ws_t *ws);
/* Close code we sent (0 if none yet). */
uint16_t on_ws_close_code_sent(const on_ws_t *ws);
/* Bytes queued inside wslay and not yet handed to `write`. */
size_t on_ws_queued_bytes(const on_ws_t *ws);

#endif
