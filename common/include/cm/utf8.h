/*
 * cm/utf8.h: UTF-8 well-formedness (RFC 3629, Unicode's "Well-Formed UTF-8 Byte Sequences").
 *
 * Untrusted strings (token claims, log values) reach JSON encoders and WebSocket text frames,
 * both of which require valid UTF-8; cJSON copies bytes through unchecked, so callers check
 * here first.
 */
#ifndef CM_UTF8_H
#define CM_UTF8_H

#include <stddef.h>

/* Length (1 to 4) of the well-formed sequence that starts `s` (`len` bytes available), or 0
 * when those bytes do not start one: a stray continuation byte, a truncated sequence, an
 * overlong form, a surrogate (U+D800..U+DFFF) or a code point above U+10FFFF. */
size_t cm_utf8_seq_len(const char *s, size_t len);

/* Non-zero when the `len` bytes of `s` are all well-formed UTF-8 (NUL bytes included). */
int cm_utf8_valid(const char *s, size_t len);

#endif
