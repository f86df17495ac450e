/*
 * fuzz_jwt: the access-token verifier (order-notifier/jwt.c on_jwt_verify), three ways per
 * input:
 *   1. the input as a token, as a client would send it (almost never correctly signed, so it
 *      exercises the splitting, base64url and header checks);
 *   2. the input as header JSON and claims JSON (cut at the first NUL byte; without one, the
 *      input is the claims under {"alg":"HS256","typ":"JWT"}), base64url-encoded and signed
 *      here with the right key, so the claim checks behind the signature are reached;
 *   3. the input as a `sub` for on_jwt_sign, whose token must verify to the same claims.
 * Checked: only the documented results; an accepted token's claims are what an independent
 * reading of its claims JSON says and meet the contract (sub 1..128 bytes of UTF-8 without
 * spaces or controls, now < exp, nbf honoured); a correctly signed token with alg "HS256" is
 * never refused for its signature, and no other alg is ever accepted.
 */
#include "fuzz.h"

#include "cm/alloc.h"
#include "cm/buf.h"
#include "cm/json.h"
#include "cm/utf8.h"
#include "jwt.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <string.h>
#include <uv.h>

static const char secret[] = "fuzz-secret-0123456789abcdef0123";
#define NOW 1800000000

static int known_rc(int rc)
{
    return rc == 0 || rc == UV_EINVAL || rc == UV_EACCES || rc == UV_ETIMEDOUT;
}

/* The contract of an accepted token's claims. */
static void check_claims(const on_jwt_claims_t *c)
{
    size_t n = strnlen(c->sub, sizeof c->sub);
    FUZZ_CHECK(n >= 1 && n <= ON_JWT_SUB_MAX);
    FUZZ_CHECK(cm_utf8_valid(c->sub, n));
    for (size_t i = 0; i < n; i++)
        FUZZ_CHECK((unsigned char)c->sub[i] > 0x20 && (unsigned char)c->sub[i] != 0x7f);
    FUZZ_CHECK(c->exp > NOW);
    FUZZ_CHECK(c->read_all == 0 || c->read_all == 1);
}

static void b64url(cm_buf_t *b, const uint8_t *p, size_t n)
{
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < n)
            v |= p[i + 2];
        char out[4] = {a[v >> 18], a[(v >> 12) & 63], a[(v >> 6) & 63], a[v & 63]};
        size_t k = n - i >= 3 ? 4 : n - i + 1;
        FUZZ_CHECK(cm_buf_append(b, out, k) == 0);
    }
}

/* What the claims JSON says, read here with cJSON directly. */
static void compare_with_claims(const uint8_t *json, size_t n, const on_jwt_claims_t *c)
{
    cJSON *j = cJSON_ParseWithLength((const char *)json, n);
    FUZZ_CHECK(cJSON_IsObject(j));
    const cJSON *sub = cJSON_GetObjectItemCaseSensitive(j, "sub");
    const cJSON *exp = cJSON_GetObjectItemCaseSensitive(j, "exp");
    const cJSON *nbf = cJSON_GetObjectItemCaseSensitive(j, "nbf");
    FUZZ_CHECK(cJSON_IsString(sub) && strcmp(sub->valuestring, c->sub) == 0);
    FUZZ_CHECK(cJSON_IsNumber(exp) && (double)c->exp == floor(exp->valuedouble));
    if (nbf)
        FUZZ_CHECK(cJSON_IsNumber(nbf) && floor(nbf->valuedouble) <= NOW);
    /* The scope: a space-separated string or an array of strings. */
    const cJSON *scope = cJSON_GetObjectItemCaseSensitive(j, "scope");
    int all = 0;
    if (cJSON_IsString(scope)) {
        char *copy = strdup(scope->valuestring);
        FUZZ_CHECK(copy);
        char *save = NULL;
        for (char *w = strtok_r(copy, " ", &save); w; w = strtok_r(NULL, " ", &save))
            all |= strcmp(w, ON_JWT_SCOPE_ALL) == 0;
        free(copy);
    } else if (cJSON_IsArray(scope)) {
        const cJSON *it;
        cJSON_ArrayForEach(it, scope)
        {
            all |= cJSON_IsString(it) && strcmp(it->valuestring, ON_JWT_SCOPE_ALL) == 0;
        }
    }
    FUZZ_CHECK(c->read_all == all);
    cJSON_Delete(j);
}

/* Whether JSON text has a \u0000 escape, read string by string. */
static int nul_escape(const uint8_t *p, size_t n)
{
    int in_string = 0;
    for (size_t i = 0; i < n; i++) {
        if (!in_string) {
            in_string = p[i] == '"';
        } else if (p[i] == '"') {
            in_string = 0;
        } else if (p[i] == '\\' && i + 1 < n) {
            if (p[i + 1] == 'u' && i + 6 <= n && memcmp(p + i + 2, "0000", 4) == 0)
                return 1;
            i++;
        }
    }
    return 0;
}

/* Whether `hdr` is a JSON object whose alg is exactly "HS256" and that names no `crit`
 * extension (RFC 7515 section 4.1.11: we understand none), as the verifier must decide it
 * (and without a \u0000 escape anywhere, which the verifier refuses outright). */
static int header_is_hs256(const uint8_t *hdr, size_t n)
{
    if (nul_escape(hdr, n))
        return 0;
    cJSON *j = cJSON_ParseWithLength((const char *)hdr, n);
    const cJSON *alg = cJSON_GetObjectItemCaseSensitive(j, "alg");
    int ok = cJSON_IsObject(j) && cJSON_IsString(alg) && strcmp(alg->valuestring, "HS256") == 0 &&
             !cJSON_GetObjectItemCaseSensitive(j, "crit");
    cJSON_Delete(j);
    return ok;
}

static void signed_token(const uint8_t *hdr, size_t hlen, const uint8_t *claims, size_t clen)
{
    cm_buf_t t = CM_BUF_INIT;
    b64url(&t, hdr, hlen);
    FUZZ_CHECK(cm_buf_append(&t, ".", 1) == 0);
    b64url(&t, claims, clen);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    FUZZ_CHECK(HMAC(EVP_sha256(), secret, (int)sizeof secret - 1, (const unsigned char *)t.data,
                    t.len, mac, &mac_len) != NULL);
    FUZZ_CHECK(cm_buf_append(&t, ".", 1) == 0);
    b64url(&t, mac, mac_len);

    on_jwt_claims_t c;
    memset(&c, 0, sizeof c);
    int rc = on_jwt_verify(t.data, t.len, secret, sizeof secret - 1, NOW, &c);
    FUZZ_CHECK(known_rc(rc));
    int hs256 = hlen && header_is_hs256(hdr, hlen);
    if (t.len <= 4096) {
        /* Signed with the right key: refused for the algorithm only, and then always. */
        if (hs256)
            FUZZ_CHECK(rc != UV_EACCES);
        else
            FUZZ_CHECK(rc == UV_EACCES || rc == UV_EINVAL);
    }
    if (rc == 0) {
        FUZZ_CHECK(hs256);
        check_claims(&c);
        compare_with_claims(claims, clen, &c);
    }
    /* The same token with another key, or one bit of its signature flipped: refused. */
    rc = on_jwt_verify(t.data, t.len, "another key", 11, NOW, &c);
    FUZZ_CHECK(rc != 0);
    t.data[t.len - 2] ^= 1;
    FUZZ_CHECK(on_jwt_verify(t.data, t.len, secret, sizeof secret - 1, NOW, &c) != 0);
    cm_buf_free(&t);
}

static void sign_round_trip(const uint8_t *data, size_t size)
{
    if (size == 0 || size > 200 || memchr(data, '\0', size))
        return;
    char sub[201];
    memcpy(sub, data, size);
    sub[size] = '\0';
    const char *scope = (data[0] & 1) ? ON_JWT_SCOPE_ALL " orders:read" : NULL;
    char *tok = on_jwt_sign(sub, NOW + 60, scope, secret, sizeof secret - 1);
    FUZZ_CHECK(tok);
    on_jwt_claims_t c;
    int rc = on_jwt_verify(tok, strlen(tok), secret, sizeof secret - 1, NOW, &c);
    /* cJSON prints any bytes of a string as they are; the verifier then judges the sub. */
    int sub_ok = size <= ON_JWT_SUB_MAX && cm_utf8_valid(sub, size);
    for (size_t i = 0; i < size && sub_ok; i++)
        sub_ok = (unsigned char)sub[i] > 0x20 && (unsigned char)sub[i] != 0x7f;
    if (sub_ok) {
        FUZZ_CHECK(rc == 0);
        FUZZ_CHECK(strcmp(c.sub, sub) == 0 && c.exp == NOW + 60 && c.read_all == (scope != NULL));
    } else {
        FUZZ_CHECK(rc == UV_EINVAL);
    }
    /* Expired a second later. */
    FUZZ_CHECK(on_jwt_verify(tok, strlen(tok), secret, sizeof secret - 1, NOW + 60, &c) ==
               (sub_ok ? UV_ETIMEDOUT : UV_EINVAL));
    cm_free(tok);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    cm_json_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    long live = cm_alloc_live();
    on_jwt_claims_t c;
    memset(&c, 0, sizeof c);
    int rc = on_jwt_verify((const char *)data, size, secret, sizeof secret - 1, NOW, &c);
    FUZZ_CHECK(known_rc(rc));
    FUZZ_CHECK(on_jwt_strerror(rc) != NULL);
    if (rc == 0)
        check_claims(&c);

    static const char def_hdr[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    const uint8_t *nul = memchr(data, '\0', size);
    if (nul)
        signed_token(data, (size_t)(nul - data), nul + 1, size - (size_t)(nul + 1 - data));
    else
        signed_token((const uint8_t *)def_hdr, sizeof def_hdr - 1, data, size);

    sign_round_trip(data, size);
    FUZZ_CHECK(cm_alloc_live() == live);
    return 0;
}
