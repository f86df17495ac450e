/*
 * cm/ws handshake: RFC 6455 §4.2.1 checks and the Sec-WebSocket-Accept value (§4.2.2).
 */
#include "cm/ws.h"

#include <llhttp.h>
#include <openssl/evp.h>
#include <string.h>
#include <strings.h>
#include <uv.h>

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

int cm_ws_accept_key(const char *key, size_t len, char out[CM_WS_ACCEPT_LEN])
{
    /* The key must be the base64 of 16 random bytes: 24 characters ending in "==". */
    unsigned char raw[24];
    if (!key || len != 24 || key[22] != '=' || key[23] != '=')
        return UV_EINVAL;
    if (EVP_DecodeBlock(raw, (const unsigned char *)key, 24) != 18)
        return UV_EINVAL;
    char cat[24 + sizeof WS_GUID];
    memcpy(cat, key, 24);
    memcpy(cat + 24, WS_GUID, sizeof WS_GUID);
    unsigned char sha[EVP_MAX_MD_SIZE];
    unsigned int sha_len = 0;
    if (!EVP_Digest(cat, 24 + sizeof WS_GUID - 1, sha, &sha_len, EVP_sha1(), NULL) || sha_len != 20)
        return UV_EINVAL;
    if (EVP_EncodeBlock((unsigned char *)out, sha, 20) != CM_WS_ACCEPT_LEN - 1)
        return UV_EINVAL;
    return 0;
}

/* Non-zero when the comma list `value` holds `token` (case-insensitive, RFC 9110 §5.6.1). */
static int has_token(const char *value, const char *token)
{
    size_t tl = strlen(token);
    const char *p = value;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        size_t n = strcspn(p, ",");
        size_t m = n;
        while (m > 0 && (p[m - 1] == ' ' || p[m - 1] == '\t'))
            m--;
        if (m == tl && strncasecmp(p, token, tl) == 0)
            return 1;
        p += n;
    }
    return 0;
}

/* Non-zero when any line of the list field `name` holds `token`: a list may be sent as several
 * lines (RFC 9110 §5.3), "Connection: keep-alive" then "Connection: Upgrade". */
static int field_has_token(const cm_http_request_t *req, const char *name, const char *token)
{
    for (size_t i = 0; i < req->nheaders; i++) {
        if (strcasecmp(req->headers[i].name, name) == 0 && has_token(req->headers[i].value, token))
            return 1;
    }
    return 0;
}

static int refuse(cm_ws_refusal_t *why, int status, const char *code, const char *message,
                  const char *headers)
{
    why->status = status;
    why->code = code;
    why->message = message;
    why->headers = headers;
    return UV_EPROTO;
}

int cm_ws_handshake_check(const cm_http_request_t *req, cm_ws_origin_fn origin_ok, void *origin_ud,
                          cm_ws_refusal_t *why)
{
    static const char upgrade_hdrs[] =
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
    /* HEAD would get a 101 without the connection ever being usable. */
    if (req->method != HTTP_GET)
        return refuse(why, 405, "method_not_allowed", "a WebSocket upgrade is a GET",
                      "Allow: GET\r\n");
    if (req->http_major < 1 || (req->http_major == 1 && req->http_minor < 1))
        return refuse(why, 400, "unsupported_http_version", "a WebSocket upgrade needs HTTP/1.1",
                      NULL);
    if (!field_has_token(req, "Upgrade", "websocket") ||
        !field_has_token(req, "Connection", "upgrade"))
        return refuse(why, 426, "upgrade_required", "this endpoint speaks WebSocket only",
                      upgrade_hdrs);
    const char *version = cm_http_header(req, "Sec-WebSocket-Version");
    if (!version || strcmp(version, "13") != 0)
        return refuse(why, 426, "unsupported_version", "WebSocket version 13 is required",
                      upgrade_hdrs);
    const char *key = cm_http_header(req, "Sec-WebSocket-Key");
    char accept[CM_WS_ACCEPT_LEN];
    if (!key || cm_ws_accept_key(key, strlen(key), accept) != 0)
        return refuse(why, 400, "bad_request", "missing or invalid Sec-WebSocket-Key", NULL);
    if (origin_ok && !origin_ok(cm_http_header(req, "Origin"), origin_ud))
        return refuse(why, 403, "origin_not_allowed", "origin not allowed", NULL);
    return 0;
}

int cm_ws_refuse(cm_http_request_t *req, const cm_ws_refusal_t *why)
{
    return cm_http_respond_error(req, why->status, why->code, why->message, why->headers);
}
