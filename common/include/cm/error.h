/*
 * cm/error.h: one error convention for common/ and both daemons.
 *
 * Every function that can fail returns 0 or a negative code, and every callback that reports
 * an outcome gets one: libuv's UV_E* codes where one fits (UV_ETIMEDOUT, UV_ENOTCONN,
 * UV_ECANCELED, UV_EINVAL, UV_ENOMEM, ...), and the CM_E* codes below for what libuv has no
 * name for. cm_strerror() gives the text of either kind. Details that only a server knows
 * (a Postgres error message, a Redis error reply) travel beside the code, never instead of it.
 */
#ifndef CM_ERROR_H
#define CM_ERROR_H

/* Below libuv's range (its lowest is UV_EOF, -4095). */
enum {
    CM_ESERVER = -5001,   /* the server answered the request with an error of its own */
    CM_EREADONLY = -5002, /* the server is read-only (a replica or a standby) */
    CM_EPROTO = -5003,    /* the server's answer is not what the protocol allows */
};

/* The text of a code: "ok" for 0, libuv's text for a UV_E* code, ours for CM_E*; never NULL. */
const char *cm_strerror(int err);

#endif
