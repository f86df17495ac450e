#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <string.h>
#include <uv.h>

#include "cm/alloc.h"
#include "cm/json.h"
#include "jwt.h"

#define SECRET "test-secret"
#define NOW 1800000000

static int verify(const char *tok, on_jwt_claims_t *c)
{
    return on_jwt_verify(tok, strlen(tok), SECRET, strlen(SECRET), NOW, c);
}

/* base64url of a literal, for hand-made tokens. */
static void b64url(const char *in, char *out)
{
    int n = EVP_EncodeBlock((unsigned char *)out, (const unsigned char *)in, (int)strlen(in));
    while (n > 0 && out[n - 1] == '=')
        n--;
    out[n] = 0;
    for (char *p = out; *p; p++)
        *p = *p == '+' ? '-' : *p == '/' ? '_' : *p;
}

/* header.payload signed with SECRET (whatever the header claims). */
static void make_token(const char *header, const char *payload, char *out)
{
    char h[512], p[512];
    b64url(header, h);
    b64url(payload, p);
    sprintf(out, "%s.%s", h, p);
    unsigned char mac[32];
    unsigned int mac_len;
    HMAC(EVP_sha256(), SECRET, (int)strlen(SECRET), (unsigned char *)out, strlen(out), mac,
         &mac_len);
    char sig[64];
    int n = EVP_EncodeBlock((unsigned char *)sig, mac, 32);
    while (n > 0 && sig[n - 1] == '=')
        n--;
    sig[n] = 0;
    for (char *q = sig; *q; q++)
        *q = *q == '+' ? '-' : *q == '/' ? '_' : *q;
    strcat(out, ".");
    strcat(out, sig);
}

static void good_token(void **state)
{
    (void)state;
    char *tok = on_jwt_sign("u1", NOW + 60, NULL, SECRET, strlen(SECRET));
    assert_non_null(tok);
    on_jwt_claims_t c;
    assert_int_equal(verify(tok, &c), 0);
    assert_string_equal(c.sub, "u1");
    assert_int_equal(c.exp, NOW + 60);
    assert_int_equal(c.read_all, 0);
    cm_free(tok);
}

static void scope_all(void **state)
{
    (void)state;
    char *tok = on_jwt_sign("ops", NOW + 60, "orders:read orders:read:all", SECRET, strlen(SECRET));
    on_jwt_claims_t c;
    assert_int_equal(verify(tok, &c), 0);
    assert_int_equal(c.read_all, 1);
    cm_free(tok);
    tok = on_jwt_sign("ops", NOW + 60, "orders:read:allx", SECRET, strlen(SECRET));
    assert_int_equal(verify(tok, &c), 0);
    assert_int_equal(c.read_all, 0);
    cm_free(tok);
    char t[1024];
    make_token("{\"alg\":\"HS256\"}",
               "{\"sub\":\"ops\",\"exp\":1800000060,\"scope\":[\"orders:read:all\"]}", t);
    assert_int_equal(verify(t, &c), 0);
    assert_int_equal(c.read_all, 1);
}

static void expired(void **state)
{
    (void)state;
    char *tok = on_jwt_sign("u1", NOW, NULL, SECRET, strlen(SECRET));
    on_jwt_claims_t c;
    assert_int_equal(verify(tok, &c), UV_ETIMEDOUT); /* exp is exclusive */
    cm_free(tok);
    char t[1024];
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"u1\",\"exp\":1800000060,\"nbf\":1800000030}", t);
    assert_int_equal(verify(t, &c), UV_ETIMEDOUT);
}

static void wrong_signature(void **state)
{
    (void)state;
    char *tok = on_jwt_sign("u1", NOW + 60, NULL, "other-secret", 12);
    on_jwt_claims_t c;
    assert_int_equal(verify(tok, &c), UV_EACCES);
    cm_free(tok);
    tok = on_jwt_sign("u1", NOW + 60, NULL, SECRET, strlen(SECRET));
    size_t n = strlen(tok);
    tok[n - 2] = tok[n - 2] == 'A' ? 'B' : 'A';
    assert_int_equal(verify(tok, &c), UV_EACCES);
    tok[n - 2] = 0; /* truncated signature */
    assert_int_equal(verify(tok, &c), UV_EACCES);
    cm_free(tok);
    /* A payload swapped under a valid signature. */
    char a[1024], b[1024];
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"u1\",\"exp\":1800000060}", a);
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"u2\",\"exp\":1800000060}", b);
    char *dot_a = strchr(a, '.'), *dot_b = strchr(b, '.');
    char mixed[2048];
    sprintf(mixed, "%.*s%s", (int)(strrchr(b, '.') - b), b, strrchr(a, '.'));
    (void)dot_a;
    (void)dot_b;
    assert_int_equal(verify(mixed, &c), UV_EACCES);
}

static void alg_none_and_others(void **state)
{
    (void)state;
    on_jwt_claims_t c;
    char h[256], p[256], t[1024];
    b64url("{\"alg\":\"none\",\"typ\":\"JWT\"}", h);
    b64url("{\"sub\":\"u1\",\"exp\":1800000060}", p);
    sprintf(t, "%s.%s.", h, p);
    assert_int_equal(verify(t, &c), UV_EACCES);
    /* Signed with our key but claiming another algorithm: still refused. */
    make_token("{\"alg\":\"HS512\"}", "{\"sub\":\"u1\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EACCES);
    make_token("{\"alg\":\"RS256\"}", "{\"sub\":\"u1\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EACCES);
    make_token("{\"typ\":\"JWT\"}", "{\"sub\":\"u1\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EACCES);
    make_token("{\"alg\":\"hs256\"}", "{\"sub\":\"u1\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EACCES);
}

static void missing_claims(void **state)
{
    (void)state;
    on_jwt_claims_t c;
    char t[1024];
    make_token("{\"alg\":\"HS256\"}", "{\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EINVAL);
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EINVAL);
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":42,\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EINVAL);
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"u1\"}", t);
    assert_int_equal(verify(t, &c), UV_EINVAL);
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"u1\",\"exp\":\"1800000060\"}", t);
    assert_int_equal(verify(t, &c), UV_EINVAL);
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"a b\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EINVAL);
    make_token("{\"alg\":\"HS256\"}", "[1,2]", t);
    assert_int_equal(verify(t, &c), UV_EINVAL);
    /* A NUL inside sub would cut it to another user's id. */
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"victim\\u0000attacker\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EINVAL);
    /* An escaped backslash, then \u0000: still a NUL. */
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"v\\\\\\u0000a\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EINVAL);
    make_token("{\"alg\":\"HS256\",\"kid\":\"\\u0000\"}", "{\"sub\":\"v\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EINVAL);
}

/* The text \u0000 (an escaped backslash, then "u0000") is no NUL: such a sub is taken as it
 * is, whether it comes from a hand-made token or from on_jwt_sign (found by fuzz_jwt). */
static void escaped_backslash_is_not_a_nul(void **state)
{
    (void)state;
    on_jwt_claims_t c;
    char t[1024];
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"a\\\\u0000b\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), 0);
    assert_string_equal(c.sub, "a\\u0000b");
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"a\\\\\\\\u0000\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), 0);
    assert_string_equal(c.sub, "a\\\\u0000");
    char *tok = on_jwt_sign("x\\u0000", NOW + 60, NULL, SECRET, strlen(SECRET));
    assert_non_null(tok);
    assert_int_equal(verify(tok, &c), 0);
    assert_string_equal(c.sub, "x\\u0000");
    cm_free(tok);
}

/* sub reaches a WebSocket text frame and the logs: bytes that are not UTF-8 are refused,
 * UTF-8 (raw or \u-escaped, surrogate pairs included) is accepted. */
static void sub_must_be_utf8(void **state)
{
    (void)state;
    on_jwt_claims_t c;
    char t[1024];
    static const char *const bad[] = {
        "{\"sub\":\"u\xff\",\"exp\":1800000060}",             /* never valid in UTF-8 */
        "{\"sub\":\"u\xc0\xaf\",\"exp\":1800000060}",         /* overlong '/' */
        "{\"sub\":\"u\xed\xa0\x80\",\"exp\":1800000060}",     /* an encoded surrogate */
        "{\"sub\":\"u\xc3\",\"exp\":1800000060}",             /* truncated sequence */
        "{\"sub\":\"\x80\x80\",\"exp\":1800000060}",          /* continuation bytes alone */
        "{\"sub\":\"u\xf4\x90\x80\x80\",\"exp\":1800000060}", /* past U+10FFFF */
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        make_token("{\"alg\":\"HS256\"}", bad[i], t);
        assert_int_equal(verify(t, &c), UV_EINVAL);
    }
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"caf\xc3\xa9\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), 0);
    assert_string_equal(c.sub, "caf\xc3\xa9");
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"\\u00e9\\ud83d\\ude00\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), 0);
    assert_string_equal(c.sub, "\xc3\xa9\xf0\x9f\x98\x80");
    /* A lone surrogate escape is not a character: cJSON refuses the document. */
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"u\\udc00\",\"exp\":1800000060}", t);
    assert_int_equal(verify(t, &c), UV_EINVAL);
}

/* A far-future exp is valid and kept exactly (the expiry timer must not overflow on it). */
static void far_future_exp(void **state)
{
    (void)state;
    on_jwt_claims_t c;
    char t[1024];
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"u1\",\"exp\":1e16}", t);
    assert_int_equal(verify(t, &c), 0);
    assert_true(c.exp == (int64_t)1e16);
}

/* Leniencies an adversarial review found: each token below verified before. */
static void strict_forms(void **state)
{
    (void)state;
    on_jwt_claims_t c;
    char tok[2048];
    const char *claims = "{\"sub\":\"u1\",\"exp\":2000000000}";
    make_token("{\"alg\":\"HS256\"}", claims, tok);
    assert_int_equal(verify(tok, &c), 0);
    /* RFC 7515 section 4.1.11: an extension we would have to understand. */
    make_token("{\"alg\":\"HS256\",\"crit\":[\"exp\"]}", claims, tok);
    assert_int_equal(verify(tok, &c), UV_EACCES);
    /* Bytes after the claims object, or after the header object. */
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"u1\",\"exp\":2000000000}junk", tok);
    assert_int_equal(verify(tok, &c), UV_EINVAL);
    make_token("{\"alg\":\"HS256\"} {}", claims, tok);
    assert_int_equal(verify(tok, &c), UV_EINVAL);
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"u1\",\"exp\":2000000000}\n ", tok);
    assert_int_equal(verify(tok, &c), 0); /* JSON whitespace around a value is fine */
    /* A repeated member name: cJSON would read the first, other parsers the last. */
    make_token("{\"alg\":\"HS256\",\"alg\":\"none\"}", claims, tok);
    assert_int_equal(verify(tok, &c), UV_EINVAL);
    make_token("{\"alg\":\"HS256\"}", "{\"sub\":\"alice\",\"sub\":\"bob\",\"exp\":2000000000}",
               tok);
    assert_int_equal(verify(tok, &c), UV_EINVAL);
    /* A second spelling of the signature: the last character's unused low bits set. A
     * 32-byte MAC is 43 characters, whose last one carries 2 unused bits. */
    make_token("{\"alg\":\"HS256\"}", claims, tok);
    size_t n = strlen(tok);
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const char *at = strchr(alphabet, tok[n - 1]);
    assert_non_null(at);
    tok[n - 1] = alphabet[(at - alphabet) ^ 1];
    assert_int_equal(verify(tok, &c), UV_EACCES);
}

static void malformed(void **state)
{
    (void)state;
    on_jwt_claims_t c;
    assert_int_equal(verify("", &c), UV_EINVAL);
    assert_int_equal(verify("abc", &c), UV_EINVAL);
    assert_int_equal(verify("a.b", &c), UV_EINVAL);
    assert_int_equal(verify("a.b.c.d", &c), UV_EINVAL);
    assert_int_equal(verify("!!!.???.***", &c), UV_EINVAL);
    assert_int_equal(verify("..", &c), UV_EINVAL);
    char big[5000];
    memset(big, 'A', sizeof big - 1);
    big[sizeof big - 1] = 0;
    assert_int_equal(verify(big, &c), UV_EINVAL);
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(good_token),      cmocka_unit_test(escaped_backslash_is_not_a_nul),
        cmocka_unit_test(scope_all),       cmocka_unit_test(expired),
        cmocka_unit_test(wrong_signature), cmocka_unit_test(alg_none_and_others),
        cmocka_unit_test(missing_claims),  cmocka_unit_test(malformed),
        cmocka_unit_test(far_future_exp),  cmocka_unit_test(sub_must_be_utf8),
        cmocka_unit_test(strict_forms),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
