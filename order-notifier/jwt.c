#include "jwt.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/utf8.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <string.h>
#include <uv.h>

/* Tokens are small; anything bigger is refused before decoding. */
#define TOKEN_MAX 4096

static int b64url_encode(cm_buf_t *b, const unsigned char *in, size_t len);

/*
 * base64url (RFC 4648 §5, unpadded) -> bytes. The alphabet is mapped back to standard base64
 * and padded so that OpenSSL's decoder does the decoding. Only the canonical encoding is
 * taken (RFC 4648 §3.5): the decoder ignores the unused low bits of the last character, so
 * without the check one token had up to 16 spellings, which defeats anything that keys on a
 * token's text. Returns the decoded length or -1.
 */
static int b64url_decode(const char *in, size_t len, unsigned char *out, size_t out_cap)
{
    if (len % 4 == 1 || len > TOKEN_MAX)
        return -1;
    char tmp[TOKEN_MAX + 4];
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (c == '-')
            c = '+';
        else if (c == '_')
            c = '/';
        else if (c == '+' || c == '/' || c == '=')
            return -1; /* not base64url */
        tmp[n++] = c;
    }
    size_t pad = (4 - len % 4) % 4;
    for (size_t i = 0; i < pad; i++)
        tmp[n++] = '=';
    if (n / 4 * 3 > out_cap)
        return -1;
    int got = EVP_DecodeBlock(out, (const unsigned char *)tmp, (int)n);
    if (got < 0)
        return -1;
    got -= (int)pad; /* EVP_DecodeBlock counts the padding as zero bytes */
    cm_buf_t again = CM_BUF_INIT;
    int canonical = b64url_encode(&again, out, (size_t)got) == 0 && again.len == len &&
                    memcmp(again.data, in, len) == 0;
    cm_buf_free(&again);
    return canonical ? got : -1;
}

/* bytes -> base64url without padding, appended to `b`. */
static int b64url_encode(cm_buf_t *b, const unsigned char *in, size_t len)
{
    size_t cap = 4 * ((len + 2) / 3) + 1;
    if (cm_buf_reserve(b, cap) != 0)
        return UV_ENOMEM;
    char *dst = b->data + b->len;
    int n = EVP_EncodeBlock((unsigned char *)dst, in, (int)len);
    while (n > 0 && dst[n - 1] == '=')
        n--;
    for (int i = 0; i < n; i++) {
        if (dst[i] == '+')
            dst[i] = '-';
        else if (dst[i] == '/')
            dst[i] = '_';
    }
    b->len += (size_t)n;
    b->data[b->len] = '\0';
    return 0;
}

/* Whether JSON text holds a \u0000 escape. A backslash escaped itself does not start one:
 * "a\\u0000" is the text a\u0000 (a backslash, then "u0000"), not a NUL. Backslashes only
 * appear inside strings in valid JSON, so no string tracking is needed. */
static int has_nul_escape(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i + 1 < n; i++) {
        if (p[i] != '\\')
            continue;
        if (p[i + 1] == 'u' && n - i >= 6 && memcmp(p + i + 2, "0000", 4) == 0)
            return 1;
        i++; /* the escaped character */
    }
    return 0;
}

/* RFC 7515 section 4: a header (and, by RFC 7519 section 4, a claims set) with a repeated
 * member name must be refused or read by its last member. cJSON would read the first, which
 * another parser disagrees with (`"alg":"HS256","alg":"none"`): refused. A token is at most
 * TOKEN_MAX bytes, so the pairwise comparison stays small. */
static int has_duplicate_names(const cJSON *obj)
{
    for (const cJSON *a = obj->child; a; a = a->next) {
        for (const cJSON *b = a->next; b; b = b->next) {
            if (strcmp(a->string, b->string) == 0)
                return 1;
        }
    }
    return 0;
}

/* Decodes one base64url JSON segment into a cJSON object (caller deletes), or NULL. */
static cJSON *decode_json(const char *seg, size_t len)
{
    unsigned char raw[TOKEN_MAX];
    int n = b64url_decode(seg, len, raw, sizeof raw);
    if (n <= 0)
        return NULL;
    /* cJSON hands strings out NUL-terminated: a "\u0000" inside one would silently cut it
     * ("victim\u0000attacker" read as "victim"). No claim of ours needs a NUL: refuse. */
    if (has_nul_escape(raw, (size_t)n))
        return NULL;
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts((const char *)raw, (size_t)n, &end, 0);
    if (!j)
        return NULL;
    /* cJSON stops after the first value: `{"sub":"a"}garbage` would pass as `{"sub":"a"}`. */
    const char *stop = (const char *)raw + n;
    while (end < stop && (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r'))
        end++;
    if (end != stop || !cJSON_IsObject(j) || has_duplicate_names(j)) {
        cJSON_Delete(j);
        return NULL;
    }
    return j;
}

/* `scope` per RFC 8693 §4.2 is a space-separated string; an array of strings is also seen. */
static int has_scope_all(const cJSON *scope)
{
    if (cJSON_IsString(scope)) {
        const char *s = scope->valuestring;
        size_t want = strlen(ON_JWT_SCOPE_ALL);
        while (*s) {
            while (*s == ' ')
                s++;
            size_t w = strcspn(s, " ");
            if (w == want && memcmp(s, ON_JWT_SCOPE_ALL, want) == 0)
                return 1;
            s += w;
        }
        return 0;
    }
    if (cJSON_IsArray(scope)) {
        const cJSON *it;
        cJSON_ArrayForEach(it, scope)
        {
            if (cJSON_IsString(it) && strcmp(it->valuestring, ON_JWT_SCOPE_ALL) == 0)
                return 1;
        }
    }
    return 0;
}

/* A NumericDate (RFC 7519 §2): a finite JSON number within int64 range. */
static int numeric_date(const cJSON *v, int64_t *out)
{
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble > 9.2e18 ||
        v->valuedouble < -9.2e18)
        return -1;
    *out = (int64_t)floor(v->valuedouble);
    return 0;
}

int on_jwt_verify(const char *token, size_t len, const void *secret, size_t secret_len, int64_t now,
                  on_jwt_claims_t *out)
{
    if (!token || len == 0 || len > TOKEN_MAX)
        return UV_EINVAL;
    const char *dot1 = memchr(token, '.', len);
    if (!dot1)
        return UV_EINVAL;
    const char *dot2 = memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token));
    if (!dot2 || memchr(dot2 + 1, '.', len - (size_t)(dot2 + 1 - token)))
        return UV_EINVAL;
    size_t hlen = (size_t)(dot1 - token);
    size_t plen = (size_t)(dot2 - dot1 - 1);
    size_t slen = len - (size_t)(dot2 + 1 - token);

    /* The algorithm is checked before anything else so `none` never reaches the claims. */
    cJSON *hdr = decode_json(token, hlen);
    if (!hdr)
        return UV_EINVAL;
    const cJSON *alg = cJSON_GetObjectItemCaseSensitive(hdr, "alg");
    /* RFC 7515 §4.1.11: a `crit` header names extensions the verifier must understand; we
     * understand none, so such a token is refused. */
    int alg_ok = cJSON_IsString(alg) && strcmp(alg->valuestring, "HS256") == 0 &&
                 !cJSON_GetObjectItemCaseSensitive(hdr, "crit");
    cJSON_Delete(hdr);
    if (!alg_ok)
        return UV_EACCES;

    unsigned char sig[64];
    int sig_len = b64url_decode(dot2 + 1, slen, sig, sizeof sig);
    if (sig_len != 32)
        return UV_EACCES;
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    if (!HMAC(EVP_sha256(), secret, (int)secret_len, (const unsigned char *)token,
              (size_t)(dot2 - token), mac, &mac_len) ||
        mac_len != 32)
        return UV_EACCES;
    if (CRYPTO_memcmp(mac, sig, 32) != 0)
        return UV_EACCES;

    cJSON *claims = decode_json(dot1 + 1, plen);
    if (!claims)
        return UV_EINVAL;
    int rc = UV_EINVAL;
    const cJSON *sub = cJSON_GetObjectItemCaseSensitive(claims, "sub");
    const cJSON *exp = cJSON_GetObjectItemCaseSensitive(claims, "exp");
    const cJSON *nbf = cJSON_GetObjectItemCaseSensitive(claims, "nbf");
    int64_t exp_v = 0, nbf_v = 0;
    if (!cJSON_IsString(sub) || numeric_date(exp, &exp_v) != 0)
        goto done;
    size_t sub_len = strlen(sub->valuestring);
    if (sub_len == 0 || sub_len > ON_JWT_SUB_MAX)
        goto done;
    /* cJSON passes raw bytes of a string through: a sub that is not UTF-8 would go out in the
     * welcome text frame (which RFC 6455 §8.1 requires to be UTF-8) and into the logs. */
    if (!cm_utf8_valid(sub->valuestring, sub_len))
        goto done;
    for (size_t i = 0; i < sub_len; i++) {
        unsigned char c = (unsigned char)sub->valuestring[i];
        if (c <= 0x20 || c == 0x7f) /* no spaces or controls: it names a Redis channel */
            goto done;
    }
    if (nbf && numeric_date(nbf, &nbf_v) != 0)
        goto done;
    if (now >= exp_v || (nbf && now < nbf_v)) {
        rc = UV_ETIMEDOUT;
        goto done;
    }
    memcpy(out->sub, sub->valuestring, sub_len + 1);
    out->exp = exp_v;
    out->read_all = has_scope_all(cJSON_GetObjectItemCaseSensitive(claims, "scope"));
    rc = 0;
done:
    cJSON_Delete(claims);
    return rc;
}

char *on_jwt_sign(const char *sub, int64_t exp, const char *scope, const void *secret,
                  size_t secret_len)
{
    static const char header[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    cm_buf_t b = CM_BUF_INIT;
    char *payload = NULL;
    cJSON *claims = cJSON_CreateObject();
    if (!claims || !cJSON_AddStringToObject(claims, "sub", sub) ||
        !cJSON_AddNumberToObject(claims, "exp", (double)exp) ||
        (scope && !cJSON_AddStringToObject(claims, "scope", scope)))
        goto fail;
    payload = cJSON_PrintUnformatted(claims);
    if (!payload)
        goto fail;
    if (b64url_encode(&b, (const unsigned char *)header, sizeof header - 1) != 0 ||
        cm_buf_puts(&b, ".") != 0 ||
        b64url_encode(&b, (const unsigned char *)payload, strlen(payload)) != 0)
        goto fail;
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    if (!HMAC(EVP_sha256(), secret, (int)secret_len, (const unsigned char *)b.data, b.len, mac,
              &mac_len))
        goto fail;
    if (cm_buf_puts(&b, ".") != 0 || b64url_encode(&b, mac, mac_len) != 0)
        goto fail;
    cJSON_free(payload);
    cJSON_Delete(claims);
    return cm_buf_steal(&b);
fail:
    cJSON_free(payload);
    cJSON_Delete(claims);
    cm_buf_free(&b);
    return NULL;
}

const char *on_jwt_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "ok";
    case UV_ETIMEDOUT:
        return "token expired";
    case UV_EACCES:
        return "bad token signature or algorithm";
    default:
        return "malformed token";
    }
}
