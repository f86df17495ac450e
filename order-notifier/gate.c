#include "gate.h"

#include "cm/alloc.h"

#include <string.h>
#include <uv.h>

void on_gate_init(on_gate_t *g)
{
    memset(g, 0, sizeof *g);
    on_idset_init(&g->rows, 0, UINT64_MAX);
}

void on_gate_hold(on_gate_t *g)
{
    g->holding = 1;
}

int on_gate_holding(const on_gate_t *g)
{
    return g->holding;
}

int on_gate_live(on_gate_t *g, int64_t id, void *data)
{
    if (!g->holding)
        return 1;
    if (on_idset_has(&g->rows, id))
        return ON_GATE_DUP;
    if (g->first + g->nheld == g->cap) {
        if (g->first > 0) {
            memmove(g->held, g->held + g->first, g->nheld * sizeof *g->held);
            g->first = 0;
        } else {
            size_t cap = g->cap ? g->cap * 2 : 16;
            on_gate_item_t *p = cm_realloc(g->held, cap * sizeof *p);
            if (!p)
                return UV_ENOMEM;
            g->held = p;
            g->cap = cap;
        }
    }
    /* Live ids mostly rise: insertion from the back is O(1) for them. */
    on_gate_item_t *base = g->held + g->first;
    size_t i = g->nheld;
    while (i > 0 && base[i - 1].id > id) {
        base[i] = base[i - 1];
        i--;
    }
    base[i] = (on_gate_item_t){id, data};
    g->nheld++;
    return 0;
}

int on_gate_row(on_gate_t *g, int64_t id, on_gate_emit_fn emit, on_gate_drop_fn drop, void *ud)
{
    while (g->nheld > 0 && g->held[g->first].id <= id) {
        on_gate_item_t it = g->held[g->first++];
        g->nheld--;
        if (it.id == id || on_idset_has(&g->rows, it.id))
            drop(it.data);
        else
            emit(it.id, it.data, ud);
    }
    return on_idset_add(&g->rows, id, 0);
}

void on_gate_release(on_gate_t *g, on_gate_emit_fn emit, on_gate_drop_fn drop, void *ud)
{
    /* Emitting may re-enter the owner, which may hold again: take the items out first. */
    on_gate_item_t *held = g->held;
    size_t first = g->first, n = g->nheld;
    on_idset_t rows = g->rows;
    g->held = NULL;
    g->first = g->nheld = g->cap = 0;
    g->holding = 0;
    on_idset_init(&g->rows, 0, UINT64_MAX);
    int64_t prev = 0;
    for (size_t i = first; i < first + n; i++) {
        if (held[i].id == prev || on_idset_has(&rows, held[i].id))
            drop(held[i].data);
        else
            emit(held[i].id, held[i].data, ud);
        prev = held[i].id;
    }
    cm_free(held);
    on_idset_free(&rows);
}

void on_gate_free(on_gate_t *g, on_gate_drop_fn drop)
{
    for (size_t i = g->first; i < g->first + g->nheld; i++)
        if (drop)
            drop(g->held[i].data);
    cm_free(g->held);
    on_idset_free(&g->rows);
    on_gate_init(g);
}
