#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <cjson/cJSON.h>
#include <iconv.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cm/alloc.h"
#include "cm/json.h"
#include "cm/log.h"

/* Every cm_log call of a test writes into this buffer (open_memstream). */
static char *out_data;
static size_t out_len;
static FILE *out;

static int setup(void **state)
{
    (void)state;
    out = open_memstream(&out_data, &out_len);
    cm_log_set_stream(out);
    return out ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    cm_log_set_stream(NULL);
    fclose(out);
    free(out_data);
    out_data = NULL;
    return 0;
}

/* What was logged since the last call (the stream is closed and opened again, so each call
 * sees only its own lines). */
static const char *take(void)
{
    static char line[4096];
    fclose(out);
    snprintf(line, sizeof line, "%s", out_data ? out_data : "");
    free(out_data);
    out_data = NULL;
    out = open_memstream(&out_data, &out_len);
    assert_non_null(out);
    cm_log_set_stream(out);
    return line;
}

/* UTF-8 check that does not share code with the library: glibc's iconv refuses malformed
 * input (EILSEQ) and truncated sequences (EINVAL). */
static int iconv_valid_utf8(const char *s)
{
    iconv_t cd = iconv_open("UTF-32LE", "UTF-8");
    assert_true(cd != (iconv_t)-1);
    size_t inleft = strlen(s);
    char *in = (char *)s;
    char buf[16384];
    char *o = buf;
    size_t oleft = sizeof buf;
    size_t r = iconv(cd, &in, &inleft, &o, &oleft);
    iconv_close(cd);
    return r != (size_t)-1 && inleft == 0;
}

/* A logfmt reader for the checks (the format has no parser in the library): fills keys and
 * values of the fields after the message, unescaping quoted values. Returns the count. */
typedef struct field {
    char key[64];
    char value[512];
    int null;
} field_t;

static int parse_fields(const char *line, const char *msg, field_t *fields, int max)
{
    const char *p = strstr(line, msg);
    assert_non_null(p);
    p += strlen(msg);
    int n = 0;
    while (*p == ' ' && n < max) {
        p++;
        field_t *f = &fields[n++];
        memset(f, 0, sizeof *f);
        size_t k = 0;
        while (*p && *p != '=' && *p != ' ' && *p != '\n')
            f->key[k++] = *p++;
        assert_int_equal(*p, '=');
        p++;
        size_t v = 0;
        if (*p == '"') {
            p++;
            while (*p != '"') {
                assert_true(*p && *p != '\n');
                if (*p == '\\') {
                    p++;
                    char e = *p++;
                    if (e == 'n')
                        f->value[v++] = '\n';
                    else if (e == 'r')
                        f->value[v++] = '\r';
                    else if (e == 't')
                        f->value[v++] = '\t';
                    else if (e == 'x' || e == 'u') {
                        if (e == 'u') {
                            assert_memory_equal(p, "00", 2);
                            p += 2;
                        }
                        char hex[3] = {p[0], p[1], 0};
                        unsigned cp = (unsigned)strtoul(hex, NULL, 16);
                        if (e == 'u') { /* U+0080..U+009F, back to UTF-8 */
                            f->value[v++] = (char)0xc2;
                            f->value[v++] = (char)cp;
                        } else {
                            f->value[v++] = (char)cp;
                        }
                        p += 2;
                    } else {
                        assert_true(e == '"' || e == '\\');
                        f->value[v++] = e;
                    }
                } else {
                    f->value[v++] = *p++;
                }
            }
            p++;
        } else if (*p == ' ' || *p == '\n' || !*p) {
            f->null = 1;
        } else {
            while (*p && *p != ' ' && *p != '\n')
                f->value[v++] = *p++;
        }
    }
    assert_int_equal(*p, '\n');
    assert_int_equal(p[1], '\0');
    return n;
}

static void text_values_round_trip(void **state)
{
    (void)state;
    cm_log_init("svc", CM_LOG_DEBUG, CM_LOG_TEXT);
    static const char *const values[] = {
        "plain",
        "Connection refused",
        "x level=error msg=\"forged\"",
        "line one\nERROR svc forged line",
        "back\\slash",
        "tab\there\r",
        "\x01\x1f\x7f",
        "caf\xc3\xa9",
        "c1 \xc2\x85 next-line",
        "broken \xff\xfe \xc3 utf-8",
        "a=b",
        "\"",
        "",
    };
    for (size_t i = 0; i < sizeof values / sizeof *values; i++) {
        cm_log_info("the message", "user", values[i], "after", "1", NULL);
        const char *line = take();
        assert_true(iconv_valid_utf8(line));
        assert_non_null(strstr(line, " INFO svc the message "));
        field_t f[4];
        assert_int_equal(parse_fields(line, "the message", f, 4), 2);
        assert_string_equal(f[0].key, "user");
        assert_false(f[0].null);
        assert_string_equal(f[0].value, values[i]);
        assert_string_equal(f[1].key, "after");
        assert_string_equal(f[1].value, "1");
    }
}

static void text_bare_and_quoted(void **state)
{
    (void)state;
    cm_log_init("svc", CM_LOG_DEBUG, CM_LOG_TEXT);
    cm_log_error("redis unavailable", "port", "8080", "error", "Connection refused", "none", NULL,
                 "empty", "", "q", "say \"hi\"", NULL);
    const char *line = take();
    const char *fields = strstr(line, "ERROR svc redis unavailable ");
    assert_non_null(fields);
    assert_string_equal(fields,
                        "ERROR svc redis unavailable port=8080 error=\"Connection refused\" "
                        "none= empty=\"\" q=\"say \\\"hi\\\"\"\n");
}

static void text_message_and_key_stay_on_one_line(void **state)
{
    (void)state;
    cm_log_init("svc", CM_LOG_DEBUG, CM_LOG_TEXT);
    cm_log_warn("two\nlines\\", "bad key=x", "v", NULL);
    const char *line = take();
    assert_non_null(strstr(line, " WARN svc two\\nlines\\\\ bad_key_x=v\n"));
    assert_int_equal(strchr(line, '\n') - line, (long)strlen(line) - 1);
}

static void json_is_valid_for_any_bytes(void **state)
{
    (void)state;
    cm_log_init("svc", CM_LOG_DEBUG, CM_LOG_JSON);
    /* Every byte value once, plus truncated, overlong and surrogate sequences. */
    char all[300];
    size_t n = 0;
    for (int b = 1; b < 256; b++)
        all[n++] = (char)b;
    strcpy(all + n, "\xc3|\xe2\x82|\xc0\xaf|\xed\xa0\x80|\xf4\x90\x80\x80");
    cm_log_info("bytes \xff", "value", all, "key \xfe", "ok", "null", NULL, NULL);
    const char *line = take();
    assert_true(iconv_valid_utf8(line));
    assert_int_equal(strchr(line, '\n') - line, (long)strlen(line) - 1);
    cJSON *j = cJSON_Parse(line);
    assert_non_null(j);
    assert_string_equal(cJSON_GetObjectItem(j, "msg")->valuestring, "bytes \xef\xbf\xbd");
    assert_string_equal(cJSON_GetObjectItem(j, "key \xef\xbf\xbd")->valuestring, "ok");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, "null")));
    const char *v = cJSON_GetObjectItem(j, "value")->valuestring;
    /* ASCII comes back as it was, control characters included (cJSON escapes them). */
    for (int b = 1; b < 128; b++)
        assert_int_equal((unsigned char)v[b - 1], b);
    assert_true(iconv_valid_utf8(v));
    cJSON_Delete(j);
}

static void json_keeps_valid_utf8(void **state)
{
    (void)state;
    cm_log_init("svc", CM_LOG_DEBUG, CM_LOG_JSON);
    const char *s = "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \"q\" \\";
    cm_log_info("m", "v", s, NULL);
    cJSON *j = cJSON_Parse(take());
    assert_non_null(j);
    assert_string_equal(cJSON_GetObjectItem(j, "v")->valuestring, s);
    cJSON_Delete(j);
}

static void levels_filter(void **state)
{
    (void)state;
    cm_log_init("svc", CM_LOG_WARN, CM_LOG_TEXT);
    cm_log_info("hidden", NULL);
    assert_string_equal(take(), "");
    cm_log_set_level(CM_LOG_DEBUG);
    cm_log_debug("shown", NULL);
    assert_non_null(strstr(take(), "DEBUG svc shown"));
}

int main(void)
{
    cm_json_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(text_values_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(text_bare_and_quoted, setup, teardown),
        cmocka_unit_test_setup_teardown(text_message_and_key_stay_on_one_line, setup, teardown),
        cmocka_unit_test_setup_teardown(json_is_valid_for_any_bytes, setup, teardown),
        cmocka_unit_test_setup_teardown(json_keeps_valid_utf8, setup, teardown),
        cmocka_unit_test_setup_teardown(levels_filter, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    return rc || cm_alloc_live() != 0;
}
