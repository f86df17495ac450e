/*
 * cm/http: JSON error answers, and the answers the server sends on its own (bad framing,
 * limits, timeouts), which always close the connection.
 */
#include "http_internal.h"

#include <cjson/cJSON.h>
#include <string.h>

int cm_http_respond_error(cm_http_request_t *req, int status, const char *code, const char *message,
                          const char *headers)
{
    char stack[512];
    char *text = NULL;
    int rc = UV_ENOMEM;
    cJSON *root = cJSON_CreateObject();
    cJSON *err = root ? cJSON_AddObjectToObject(root, "error") : NULL;
    if (err && cJSON_AddStringToObject(err, "code", code ? code : "error") &&
        cJSON_AddStringToObject(err, "message", message ? message : "")) {
        if (cJSON_PrintPreallocated(root, stack, (int)sizeof stack, 0))
            text = stack;
        else
            text = cJSON_PrintUnformatted(root);
    }
    cJSON_Delete(root);
    if (text) {
        rc = cm_http_respond(req, status, "application/json", headers, text, strlen(text));
        if (text != stack)
            cJSON_free(text);
        return rc;
    }
    /* Out of memory: still answer, so the request is not left hanging. */
    static const char fallback[] = "{\"error\":{\"code\":\"internal_error\",\"message\":\"\"}}";
    cm_http_respond(req, status, "application/json", headers, fallback, sizeof fallback - 1);
    return rc;
}

/* Answers an error the server found itself (bad framing, limits, timeout) and closes. */
void http_conn_fail(cm_http_conn_t *c, int status, const char *code, const char *msg)
{
    cm_http_request_t *r = &c->req;
    if (!c->req_ready) {
        r->conn = c;
        r->method = c->parser.method;
        r->method_name = http_empty;
        r->target = r->path = r->query = http_empty;
        r->path_len = r->query_len = 0;
        r->headers = NULL;
        r->nheaders = 0;
        r->http_major = c->parser.http_major;
        r->http_minor = c->parser.http_minor;
        r->is_head = 0;
        r->start_ns = c->msg_start_ns;
    }
    r->body = http_empty;
    r->body_len = 0;
    r->keep_alive = 0;
    r->route = "unmatched";
    r->user = NULL;
    c->busy = 1;
    c->in_request = 0;
    http_timer_disarm(c);
    cm_http_respond_error(r, status, code, msg, NULL);
}
