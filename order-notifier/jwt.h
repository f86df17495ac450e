/*
 * jwt.h: validation of the notifier's access tokens, JWT HS256 (RFC 7519, RFC 7515).
 *
 * Only HS256 is accepted: the header's `alg` must be exactly "HS256" so that `none` and the
 * asymmetric algorithms (key confusion) are refused before any signature work. `sub` (the user
 * id) and a numeric `exp` are required; `nbf`, when present, is honoured. The signature is
 * computed with OpenSSL's HMAC and compared with CRYPTO_memcmp (constant time).
 */
#ifndef ON_JWT_H
#define ON_JWT_H

#include <stddef.h>
#include <stdint.h>

/* Longest accepted `sub`, in bytes: it becomes part of a Redis channel name. */
#define ON_JWT_SUB_MAX 128
/* The scope that lets a socket see every user's events. */
#define ON_JWT_SCOPE_ALL "orders:read:all"

typedef struct on_jwt_claims {
    char sub[ON_JWT_SUB_MAX + 1]; /* NUL-terminated user id */
    int64_t exp;                  /* expiry, Unix seconds */
    int read_all;                 /* non-zero when `scope` holds orders:read:all */
} on_jwt_claims_t;

/*
 * Validates `token` (`len` bytes, borrowed) against the HS256 key `secret` (`secret_len`
 * bytes, borrowed) at time `now` (Unix seconds) and fills `*out`.
 * `sub` must be 1 to ON_JWT_SUB_MAX bytes of well-formed UTF-8 without spaces or controls.
 * Returns 0; UV_EINVAL for a malformed token or a missing/invalid `sub` or `exp`; UV_EACCES
 * for a wrong algorithm or signature; UV_ETIMEDOUT when expired (now >= exp) or not yet valid.
 */
int on_jwt_verify(const char *token, size_t len, const void *secret, size_t secret_len, int64_t now,
                  on_jwt_claims_t *out);

/*
 * Issues an HS256 token for `sub` expiring at `exp` (Unix seconds), with `scope` unless NULL.
 * For tests, the load generator and development. Returns a NUL-terminated string the caller
 * frees with cm_free(), or NULL on allocation failure.
 */
char *on_jwt_sign(const char *sub, int64_t exp, const char *scope, const void *secret,
                  size_t secret_len);

/* Short reason for a verification result, for logs and 401 bodies ("expired"). */
const char *on_jwt_strerror(int rc);

#endif
