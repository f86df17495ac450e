#include "cm/log.h"

#include "cm/buf.h"
#include "cm/utf8.h"

#include <cjson/cJSON.h>
#include <stdarg.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <uv.h>

static const char *names[] = {"debug", "info", "warn", "error"};
static const char *service_name = "markets";
static cm_log_level_t min_level = CM_LOG_INFO;
static cm_log_format_t out_format = CM_LOG_JSON;
static FILE *out_stream;

int cm_log_level_parse(const char *s, cm_log_level_t *out)
{
    for (int i = 0; i < 4; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = (cm_log_level_t)i;
            return 0;
        }
    }
    return UV_EINVAL;
}

int cm_log_format_parse(const char *s, cm_log_format_t *out)
{
    if (strcmp(s, "json") == 0)
        *out = CM_LOG_JSON;
    else if (strcmp(s, "text") == 0)
        *out = CM_LOG_TEXT;
    else
        return UV_EINVAL;
    return 0;
}

const char *cm_log_level_name(cm_log_level_t level)
{
    return (unsigned)level < 4 ? names[level] : "info";
}

void cm_log_init(const char *service, cm_log_level_t level, cm_log_format_t format)
{
    service_name = service;
    min_level = level;
    out_format = format;
}

void cm_log_set_level(cm_log_level_t level)
{
    min_level = level;
}

int cm_log_enabled(cm_log_level_t level)
{
    return level >= min_level;
}

void cm_log_set_stream(FILE *stream)
{
    out_stream = stream;
}

static void format_time(char *out, size_t size)
{
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(out, size, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, size - n, ".%03dZ", (int)(tv.tv_usec / 1000));
}

/* `s` itself when it is valid UTF-8, else a copy in `scratch` with every byte that is not part
 * of a well-formed sequence replaced by U+FFFD: cJSON copies bytes through unchecked, and a
 * log line with invalid UTF-8 is not JSON (RFC 8259 §8.1), so collectors drop or mangle it. */
static const char *json_safe(const char *s, cm_buf_t *scratch)
{
    size_t len = strlen(s);
    if (cm_utf8_valid(s, len))
        return s;
    cm_buf_reset(scratch);
    for (size_t i = 0; i < len;) {
        size_t n = cm_utf8_seq_len(s + i, len - i);
        int rc = n ? cm_buf_append(scratch, s + i, n) : cm_buf_puts(scratch, "\xef\xbf\xbd");
        if (rc != 0)
            return "(invalid UTF-8)";
        i += n ? n : 1;
    }
    return scratch->data ? scratch->data : "";
}

static void write_json(FILE *f, const char *ts, cm_log_level_t level, const char *msg, va_list ap)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) {
        fprintf(f, "{\"level\":\"%s\",\"msg\":\"log: out of memory\"}\n", names[level]);
        return;
    }
    /* Keys and values each need their own scratch: cJSON copies both before the next call. */
    cm_buf_t kbuf = CM_BUF_INIT, vbuf = CM_BUF_INIT;
    cJSON_AddStringToObject(o, "ts", ts);
    cJSON_AddStringToObject(o, "level", names[level]);
    cJSON_AddStringToObject(o, "service", json_safe(service_name, &vbuf));
    cJSON_AddStringToObject(o, "msg", json_safe(msg, &vbuf));
    for (const char *k = va_arg(ap, const char *); k; k = va_arg(ap, const char *)) {
        const char *v = va_arg(ap, const char *);
        const char *key = json_safe(k, &kbuf);
        if (v)
            cJSON_AddStringToObject(o, key, json_safe(v, &vbuf));
        else
            cJSON_AddNullToObject(o, key);
    }
    cm_buf_free(&kbuf);
    cm_buf_free(&vbuf);
    char *line = cJSON_PrintUnformatted(o);
    if (line) {
        fputs(line, f);
        fputc('\n', f);
        cJSON_free(line);
    }
    cJSON_Delete(o);
}

/* A value may go out bare when every byte is printable ASCII other than the ones that delimit
 * fields (space, '=') or quoting ('"', '\\'); anything else is quoted so that a value cannot
 * end its field early and forge another one (a token subject of `x level=error`). */
static int text_bare(const char *v)
{
    if (!*v)
        return 0;
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        if (*p <= 0x20 || *p >= 0x7f || *p == '"' || *p == '=' || *p == '\\')
            return 0;
    }
    return 1;
}

/* Writes `s` with its control characters, backslashes and (when `quotes`) double quotes
 * escaped, logfmt-style: \n \r \t \" \\, other C0/C1 controls and DEL as \xHH or \u00HH, and
 * bytes that are not well-formed UTF-8 as \xHH, so the line stays one valid UTF-8 line. */
static void text_escaped(FILE *f, const char *s, int quotes)
{
    size_t len = strlen(s);
    for (size_t i = 0; i < len;) {
        unsigned char ch = (unsigned char)s[i];
        size_t n = cm_utf8_seq_len(s + i, len - i);
        if (n > 1) {
            unsigned char next = (unsigned char)s[i + 1];
            if (ch == 0xc2 && next < 0xa0) /* U+0080..U+009F: C1 controls */
                fprintf(f, "\\u00%02x", next);
            else
                fwrite(s + i, 1, n, f);
            i += n;
            continue;
        }
        i++;
        if (n == 0)
            fprintf(f, "\\x%02x", ch);
        else if (ch == '\n')
            fputs("\\n", f);
        else if (ch == '\r')
            fputs("\\r", f);
        else if (ch == '\t')
            fputs("\\t", f);
        else if (ch == '\\')
            fputs("\\\\", f);
        else if (ch == '"' && quotes)
            fputs("\\\"", f);
        else if (ch < 0x20 || ch == 0x7f)
            fprintf(f, "\\x%02x", ch);
        else
            fputc(ch, f);
    }
}

/* A key is an identifier in every call site; anything else becomes '_' rather than a
 * delimiter. */
static void text_key(FILE *f, const char *k)
{
    for (const unsigned char *p = (const unsigned char *)k; *p; p++) {
        int ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                 *p == '_' || *p == '.' || *p == '-';
        fputc(ok ? *p : '_', f);
    }
}

static void write_text(FILE *f, const char *ts, cm_log_level_t level, const char *msg, va_list ap)
{
    static const char *upper[] = {"DEBUG", "INFO", "WARN", "ERROR"};
    fprintf(f, "%s %s ", ts, upper[level]);
    text_escaped(f, service_name, 0);
    fputc(' ', f);
    /* The message is free text up to the first field (a literal at every call site); only
     * what could break the line is escaped. */
    text_escaped(f, msg, 0);
    for (const char *k = va_arg(ap, const char *); k; k = va_arg(ap, const char *)) {
        const char *v = va_arg(ap, const char *);
        fputc(' ', f);
        text_key(f, k);
        fputc('=', f);
        if (!v) /* JSON's null: nothing after '=' (an empty string is written "") */
            continue;
        if (text_bare(v)) {
            fputs(v, f);
        } else {
            fputc('"', f);
            text_escaped(f, v, 1);
            fputc('"', f);
        }
    }
    fputc('\n', f);
}

void cm_log(cm_log_level_t level, const char *msg, ...)
{
    if ((unsigned)level > CM_LOG_ERROR || level < min_level)
        return;
    FILE *f = out_stream ? out_stream : stderr;
    char ts[40];
    format_time(ts, sizeof ts);
    va_list ap;
    va_start(ap, msg);
    if (out_format == CM_LOG_JSON)
        write_json(f, ts, level, msg, ap);
    else
        write_text(f, ts, level, msg, ap);
    va_end(ap);
    fflush(f);
}
