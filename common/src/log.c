#include "cm/log.h"

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

static void write_json(FILE *f, const char *ts, cm_log_level_t level, const char *msg, va_list ap)
{
    cJSON *o = cJSON_CreateObject();
    if (!o) {
        fprintf(f, "{\"level\":\"%s\",\"msg\":\"log: out of memory\"}\n", names[level]);
        return;
    }
    cJSON_AddStringToObject(o, "ts", ts);
    cJSON_AddStringToObject(o, "level", names[level]);
    cJSON_AddStringToObject(o, "service", service_name);
    cJSON_AddStringToObject(o, "msg", msg);
    for (const char *k = va_arg(ap, const char *); k; k = va_arg(ap, const char *)) {
        const char *v = va_arg(ap, const char *);
        if (v)
            cJSON_AddStringToObject(o, k, v);
        else
            cJSON_AddNullToObject(o, k);
    }
    char *line = cJSON_PrintUnformatted(o);
    if (line) {
        fputs(line, f);
        fputc('\n', f);
        cJSON_free(line);
    }
    cJSON_Delete(o);
}

static void write_text(FILE *f, const char *ts, cm_log_level_t level, const char *msg, va_list ap)
{
    static const char *upper[] = {"DEBUG", "INFO", "WARN", "ERROR"};
    fprintf(f, "%s %s %s %s", ts, upper[level], service_name, msg);
    for (const char *k = va_arg(ap, const char *); k; k = va_arg(ap, const char *)) {
        const char *v = va_arg(ap, const char *);
        fprintf(f, " %s=\"%s\"", k, v ? v : "");
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
