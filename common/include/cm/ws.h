/*
 * cm/ws.h: the server side of RFC 6455 WebSocket on an upgraded cm_http connection.
 *
 * Handshake: cm_ws_handshake_check() applies RFC 6455 §4.2.1 to a request and says why it
 * refuses; cm_ws_accept() answers 101 and turns the connection into a session that owns it.
 *
 * Reading: an incremental frame-header pre-parser sees each header before wslay does and fails
 * the connection with the code the RFC asks for (1002 for bad framing, a bad close body or
 * code; 1007 for invalid UTF-8 in a text message or a close reason; 1009 for a message over
 * max_message), decided from the header, before any payload is read. wslay's frame layer
 * (wslay_frame_recv) then unmasks the payload; its context (a 4 KB input buffer) only exists
 * while a frame is partly read, so an idle socket holds none. Messages are reassembled here;
 * pings are answered with pongs echoing the payload; a close with a close echoing its code,
 * after which the TCP connection is closed once the reply is written.
 *
 * Writing: every frame (data, pong, close) goes into the connection's one corked queue
 * (cm_http), which leaves in one writev per loop turn. What is queued and not yet written
 * counts against send_queue_max: past it a send returns UV_ENOBUFS (the owner decides; a 1013
 * close is usual), a ping that would push it over closes with 1013, and reading pauses until
 * the queue is back under it. A cm_ws_frame_t is encoded once and queued by reference to any
 * number of sessions (server frames are unmasked, so the bytes are the same for everyone).
 *
 * Early messages: until the owner calls cm_ws_start() (it may still be setting up), messages
 * are kept, up to early_max bytes (past it: close 1008), and delivered after it, in order;
 * control frames are answered meanwhile.
 *
 * Callbacks run on the loop, never inside the cm_ws_* call that led to them. Not thread-safe:
 * sessions and frames of one process share an encoder, so all of them belong to one thread.
 */
#ifndef CM_WS_H
#define CM_WS_H

#include "cm/http.h"

#include <stddef.h>
#include <stdint.h>

/* Opcodes (RFC 6455 §5.2). */
enum {
    CM_WS_OP_TEXT = 0x1,
    CM_WS_OP_BINARY = 0x2,
    CM_WS_OP_CLOSE = 0x8,
    CM_WS_OP_PING = 0x9,
    CM_WS_OP_PONG = 0xa,
};

/* Close codes (RFC 6455 §7.4.1, and 1013 from the IANA registry). */
enum {
    CM_WS_CLOSE_NORMAL = 1000,
    CM_WS_CLOSE_GOING_AWAY = 1001,
    CM_WS_CLOSE_PROTOCOL = 1002,
    CM_WS_CLOSE_UNSUPPORTED = 1003,
    CM_WS_CLOSE_NO_STATUS = 1005, /* never sent: "the close had no code" */
    CM_WS_CLOSE_INVALID_DATA = 1007,
    CM_WS_CLOSE_POLICY = 1008,
    CM_WS_CLOSE_TOO_BIG = 1009,
    CM_WS_CLOSE_INTERNAL = 1011,
    CM_WS_CLOSE_TRY_AGAIN = 1013,
};

/* ---- handshake ------------------------------------------------------------------------------ */

/* Length of a Sec-WebSocket-Accept value (base64 of a SHA-1) plus its NUL. */
#define CM_WS_ACCEPT_LEN 29

/*
 * Computes Sec-WebSocket-Accept for the client's Sec-WebSocket-Key (`key`, `len` bytes,
 * borrowed) per RFC 6455 §4.2.2: base64(SHA-1(key + GUID)). `out` receives a NUL-terminated
 * string. Returns 0, or UV_EINVAL when the key is not the base64 of 16 bytes (§4.1).
 */
int cm_ws_accept_key(const char *key, size_t len, char out[CM_WS_ACCEPT_LEN]);

/* Decides whether `origin` (the Origin header, NULL when absent) may connect: non-zero yes. */
typedef int (*cm_ws_origin_fn)(const char *origin, void *ud);

/* Why a handshake is refused: the answer to give (static strings). */
typedef struct cm_ws_refusal {
    int status;          /* HTTP status */
    const char *code;    /* JSON error code */
    const char *message; /* human-readable */
    const char *headers; /* extra header lines ("Name: value\r\n"...), or NULL */
} cm_ws_refusal_t;

/*
 * RFC 6455 §4.2.1 on `req` (borrowed), in this order:
 *   method other than GET               405 method_not_allowed, Allow: GET
 *   HTTP/1.0 (below 1.1)                400 unsupported_http_version (§4.1 needs HTTP/1.1, and
 *                                       RFC 9110 §7.8 has a server ignore Upgrade in 1.0: a
 *                                       426 would ask for an upgrade the client cannot make)
 *   no Upgrade: websocket, or no
 *   Connection: upgrade token           426 upgrade_required, Upgrade: websocket
 *   Sec-WebSocket-Version not 13        426 unsupported_version, Sec-WebSocket-Version: 13
 *   Sec-WebSocket-Key not base64 of 16  400 bad_request
 *   origin_ok (may be NULL) says no     403 origin_not_allowed
 * Returns 0 when the upgrade may go ahead, else UV_EPROTO with *why filled; the caller answers
 * (cm_ws_refuse) after whatever accounting it does.
 */
int cm_ws_handshake_check(const cm_http_request_t *req, cm_ws_origin_fn origin_ok, void *origin_ud,
                          cm_ws_refusal_t *why);
/* Answers `req` with `why` as a JSON error (cm_http_respond_error). Returns as that does. */
int cm_ws_refuse(cm_http_request_t *req, const cm_ws_refusal_t *why);

/* ---- sessions ------------------------------------------------------------------------------ */

typedef struct cm_ws cm_ws_t;

typedef struct cm_ws_callbacks {
    /* A complete text (UTF-8 checked) or binary message; `data` is borrowed for the call and
     * not NUL-terminated. Required. */
    void (*on_message)(cm_ws_t *ws, int opcode, const char *data, size_t len, void *ud);
    /* Bytes arrived from the peer (liveness). Optional. */
    void (*on_activity)(cm_ws_t *ws, void *ud);
    /* The session is ending on its own: a protocol error, the peer's close, a ping flood over
     * the queue cap (1013), too many early messages. `code` is the close code sent (0: the
     * close had none). Not called after cm_ws_close() or cm_ws_abort(). No message follows; the
     * TCP connection closes once the close is written. Optional. */
    void (*on_closing)(cm_ws_t *ws, uint16_t code, void *ud);
    /* The TCP connection has closed. The session is freed when this returns. Required. */
    void (*on_close)(cm_ws_t *ws, void *ud);
} cm_ws_callbacks_t;

typedef struct cm_ws_config {
    size_t max_message;    /* largest message from the peer, bytes (default 64 KiB); over: 1009 */
    size_t send_queue_max; /* cap on queued, unwritten bytes (default 1 MiB) */
    size_t early_max;      /* bytes of messages kept before cm_ws_start (default 8 KiB) */
    const char *headers;   /* extra 101 header lines, e.g. "Sec-WebSocket-Protocol: x\r\n" */
} cm_ws_config_t;

/* Fills `cfg` with the defaults above. */
void cm_ws_config_defaults(cm_ws_config_t *cfg);

/*
 * Answers `req` with 101 (Sec-WebSocket-Accept from its key) and makes the connection a
 * session; call it after cm_ws_handshake_check() passed. `cfg` (NULL: defaults) and `cbs` are
 * copied; `ud` goes to every callback. Returns 0 and *out (valid until on_close returns), or a
 * negative code: UV_EINVAL (no valid key: answered 400), UV_ENOMEM (answered 503), or the
 * upgrade's error (the connection is closed). No callback fires on failure.
 */
int cm_ws_accept(cm_http_request_t *req, const cm_ws_config_t *cfg, const cm_ws_callbacks_t *cbs,
                 void *ud, cm_ws_t **out);
/* The owner is ready for messages: the early ones are delivered on a later loop turn (not
 * inside this call), then the rest as they come. A second call is a no-op. */
void cm_ws_start(cm_ws_t *ws);

/*
 * Queues one unfragmented frame: text, binary, ping or pong (control payloads up to 125 bytes)
 * with `len` bytes of `data` (copied). Returns 0; UV_ENOBUFS when it is queued but the queue is
 * now over send_queue_max (reading paused; the owner should close, usually with 1013);
 * UV_EPIPE once closing; UV_EINVAL for a bad opcode or length; UV_ENOMEM (connection closed).
 */
int cm_ws_send(cm_ws_t *ws, int opcode, const void *data, size_t len);
/* cm_ws_send(ws, CM_WS_OP_TEXT, data, len). */
int cm_ws_send_text(cm_ws_t *ws, const char *data, size_t len);

/* An encoded server frame shared by many sessions (reference counted). */
typedef struct cm_ws_frame cm_ws_frame_t;
/* Encodes `len` bytes of `payload` (copied) as one unfragmented frame of `opcode`, once.
 * Returns 0 and *out with one reference, UV_EINVAL, or UV_ENOMEM. */
int cm_ws_frame_new(int opcode, const void *payload, size_t len, cm_ws_frame_t **out);
/* Adds a reference; returns `f`. */
cm_ws_frame_t *cm_ws_frame_ref(cm_ws_frame_t *f);
/* Drops a reference; the last one frees the frame. NULL is a no-op. */
void cm_ws_frame_unref(cm_ws_frame_t *f);
/* The payload (borrowed from `f`) and its length. */
const char *cm_ws_frame_payload(const cm_ws_frame_t *f, size_t *len);
/* Encoded size: header plus payload. */
size_t cm_ws_frame_size(const cm_ws_frame_t *f);
/* Queues `f` by reference (held until the kernel has the bytes or the connection closed).
 * Returns as cm_ws_send(). */
int cm_ws_send_frame(cm_ws_t *ws, cm_ws_frame_t *f);

/*
 * Starts the closing handshake: queues a close with `code` (0: none) and `reason` (may be
 * NULL; up to 123 bytes of UTF-8), ignores later input, and closes the TCP connection once
 * the queue is written (a peer that does not read is cut off by cm_http's idle timeout, or by
 * the owner's own cm_ws_abort). Returns 0 (also when already closing) or UV_EINVAL.
 */
int cm_ws_close(cm_ws_t *ws, uint16_t code, const char *reason);
/* Closes the TCP connection now, dropping what is queued. on_close follows from the loop. */
void cm_ws_abort(cm_ws_t *ws);

/* Bytes queued and not yet taken by the kernel (what send_queue_max caps). */
size_t cm_ws_queued_bytes(const cm_ws_t *ws);
/* Non-zero once a close was sent or the connection is closing. */
int cm_ws_closing(const cm_ws_t *ws);
/* Close code sent (0: none yet, or a close without a code). */
uint16_t cm_ws_close_code_sent(const cm_ws_t *ws);
/* Close code the peer sent (0: no close yet; CM_WS_CLOSE_NO_STATUS: a close without one). */
uint16_t cm_ws_close_code_received(const cm_ws_t *ws);
/* The underlying connection (for cm_http_conn_peer). */
cm_http_conn_t *cm_ws_conn(const cm_ws_t *ws);

#endif
