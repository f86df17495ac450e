/*
 * ws_internal.h: the pieces of cm/ws shared by its sources (and the unit tests), not part of
 * the public API.
 */
#ifndef CM_WS_INTERNAL_H
#define CM_WS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

/* Largest frame header: 2 bytes, a 64-bit length, a masking key. */
#define WS_HDR_MAX 14
/* "Need more input" from the header pre-parser (nginx's NGX_AGAIN). */
#define WS_AGAIN 1

/* A client frame header as the pre-parser read it. */
typedef struct ws_hdr {
    uint8_t fin, rsv, opcode, masked;
    uint64_t len; /* payload length */
    size_t size;  /* header bytes: 2 to 14; while WS_AGAIN, how many are needed so far */
} ws_hdr_t;

/*
 * Parses the client frame header in `buf[0..have)`. Returns 0 when it is complete (h->size
 * bytes), WS_AGAIN when more bytes are needed (h->size is the total known so far), or
 * UV_EPROTO as soon as the bytes show a header RFC 6455 forbids from a client: RSV bits
 * without an extension (§5.2), a reserved opcode, no mask (§5.1), a control frame that is
 * fragmented or over 125 bytes (§5.5), a length not in its shortest form or with the top bit
 * set (§5.2). Each of those closes with 1002. Order and message size are checked by the caller.
 */
int ws_parse_header(const uint8_t *buf, size_t have, ws_hdr_t *h);

/* Incremental UTF-8 validation (RFC 3629 §4: no overlongs, surrogates, or code points past
 * U+10FFFF), across the fragments of a message. Zero-initialise to start. */
typedef struct ws_utf8 {
    uint8_t need;   /* continuation bytes still expected */
    uint8_t lo, hi; /* allowed range of the next continuation byte */
} ws_utf8_t;

/* Returns 0 while the bytes so far can begin valid UTF-8, UV_EILSEQ at the first that
 * cannot. */
int ws_utf8_feed(ws_utf8_t *u, const uint8_t *p, size_t n);
/* Non-zero when no sequence is left open (the message may end here). */
int ws_utf8_complete(const ws_utf8_t *u);

/* Receives encoded bytes; returns 0 or a negative UV_E* code (kept for the caller). */
typedef int (*ws_sink_fn)(const uint8_t *data, size_t len, void *arg);

/* Header bytes of a server frame (unmasked) with `len` bytes of payload. */
size_t ws_header_size(uint64_t len);
/*
 * Encodes one unfragmented, unmasked server frame with wslay's frame layer: `sink` gets the
 * header, then the payload. Returns 0, UV_EINVAL (a control frame over 125 bytes), UV_ENOMEM
 * (no encoder), or the first error `sink` returned (the frame is then incomplete).
 */
int ws_encode(uint8_t opcode, const void *payload, size_t len, ws_sink_fn sink, void *arg);
/* The wslay context ws_encode uses is kept while someone holds it (a session, say), so it is
 * not set up per frame; with no holder left it is freed. */
void ws_encoder_hold(void);
void ws_encoder_release(void);

/* The encoded bytes of a shared frame (cm_ws_frame_size() of them). */
struct cm_ws_frame;
const uint8_t *ws_frame_bytes(const struct cm_ws_frame *f);

/* Non-zero for a close code a peer may send (RFC 6455 §7.4: 1000-1003, 1007-1014 as
 * registered with IANA, 3000-4999); 1004-1006, 1015 and the rest are reserved. */
int ws_close_code_valid(unsigned code);

#endif
