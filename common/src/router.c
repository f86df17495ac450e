/*
 * Exact-path router. The daemons register a handful of routes, so a linear scan that compares
 * lengths first beats hashing; the Allow value of every route is built once at registration.
 */
#include "cm/router.h"

#include "cm/alloc.h"

#include <llhttp.h>
#include <string.h>

typedef struct route {
    char *path;
    size_t path_len;
    unsigned methods;
    cm_http_handler_fn fn;
    void *ud;
    char *allow_header; /* "Allow: GET, HEAD\r\n" */
} route_t;

struct cm_router {
    route_t *routes;
    size_t n, cap;
};

static const struct {
    unsigned bit;
    int method;
    const char *name;
} METHODS[] = {
    {CM_ROUTE_GET, HTTP_GET, "GET"},
    {CM_ROUTE_HEAD, HTTP_HEAD, "HEAD"},
    {CM_ROUTE_POST, HTTP_POST, "POST"},
    {CM_ROUTE_PUT, HTTP_PUT, "PUT"},
    {CM_ROUTE_DELETE, HTTP_DELETE, "DELETE"},
    {CM_ROUTE_PATCH, HTTP_PATCH, "PATCH"},
    {CM_ROUTE_OPTIONS, HTTP_OPTIONS, "OPTIONS"},
};
#define NMETHODS (sizeof METHODS / sizeof METHODS[0])
#define ALL_METHODS ((unsigned)CM_ROUTE_OPTIONS * 2 - 1)

cm_router_t *cm_router_new(void)
{
    return cm_calloc(1, sizeof(cm_router_t));
}

void cm_router_free(cm_router_t *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->n; i++) {
        cm_free(r->routes[i].path);
        cm_free(r->routes[i].allow_header);
    }
    cm_free(r->routes);
    cm_free(r);
}

static char *build_allow(unsigned methods)
{
    char tmp[128] = "Allow: ";
    size_t len = strlen(tmp);
    int first = 1;
    for (size_t i = 0; i < NMETHODS; i++) {
        if (!(methods & METHODS[i].bit))
            continue;
        if (!first) {
            memcpy(tmp + len, ", ", 2);
            len += 2;
        }
        size_t nl = strlen(METHODS[i].name);
        memcpy(tmp + len, METHODS[i].name, nl);
        len += nl;
        first = 0;
    }
    memcpy(tmp + len, "\r\n", 2);
    len += 2;
    return cm_strndup(tmp, len);
}

int cm_router_add(cm_router_t *r, unsigned methods, const char *path, cm_http_handler_fn fn,
                  void *ud)
{
    if (!r || !path || path[0] != '/' || !fn || !(methods & ALL_METHODS) ||
        (methods & ~ALL_METHODS))
        return UV_EINVAL;
    if (methods & CM_ROUTE_GET)
        methods |= CM_ROUTE_HEAD;
    size_t len = strlen(path);
    for (size_t i = 0; i < r->n; i++) {
        if (r->routes[i].path_len == len && memcmp(r->routes[i].path, path, len) == 0)
            return UV_EEXIST;
    }
    if (r->n == r->cap) {
        size_t ncap = r->cap ? r->cap * 2 : 8;
        route_t *nr = cm_realloc(r->routes, ncap * sizeof *nr);
        if (!nr)
            return UV_ENOMEM;
        r->routes = nr;
        r->cap = ncap;
    }
    route_t *rt = &r->routes[r->n];
    rt->path = cm_strndup(path, len);
    rt->allow_header = build_allow(methods);
    if (!rt->path || !rt->allow_header) {
        cm_free(rt->path);
        cm_free(rt->allow_header);
        return UV_ENOMEM;
    }
    rt->path_len = len;
    rt->methods = methods;
    rt->fn = fn;
    rt->ud = ud;
    r->n++;
    return 0;
}

static unsigned method_bit(int method)
{
    for (size_t i = 0; i < NMETHODS; i++) {
        if (METHODS[i].method == method)
            return METHODS[i].bit;
    }
    return 0;
}

void cm_router_dispatch(cm_http_request_t *req, void *router)
{
    cm_router_t *r = router;
    for (size_t i = 0; i < r->n; i++) {
        route_t *rt = &r->routes[i];
        if (rt->path_len != req->path_len || memcmp(rt->path, req->path, req->path_len) != 0)
            continue;
        req->route = rt->path;
        if (method_bit(req->method) & rt->methods) {
            rt->fn(req, rt->ud);
            return;
        }
        cm_http_respond_error(req, 405, "method_not_allowed", "method not allowed on this path",
                              rt->allow_header);
        return;
    }
    req->route = "unmatched";
    cm_http_respond_error(req, 404, "not_found", "no such path", NULL);
}
