/*
 * gate.h: holds live events back while a read of the outbox is merged in front of them.
 *
 * Every path that recovers events from `order_events` (a new leader's catch-up, a replica's
 * replay after its Redis subscriber reconnects, a client's resume) runs while live events keep
 * arriving. Sending the live ones at once would put an order's `filled` ahead of the
 * `partially_filled` the read is about to recover. So while a read is in progress live events
 * are held here, and each row of the read (rows come in id order) first releases the held
 * events with a lower id. The merged stream is in id order, and for one order id order is
 * commit order (each update of an order waits on the row lock of the previous one, and takes
 * its event id after it), so per-order order holds whatever the commits of other orders did.
 * Rows are remembered so that a live copy of one, arriving later, is dropped.
 *
 * Pure logic, no I/O: the owner says what to do with each released item.
 */
#ifndef ON_GATE_H
#define ON_GATE_H

#include "dedup.h"

#include <stddef.h>
#include <stdint.h>

typedef struct on_gate_item {
    int64_t id;
    void *data; /* the owner's, handed back by emit or drop */
} on_gate_item_t;

/* emit: release `data` (the callee owns it from here). drop: a duplicate, free `data`. */
typedef void (*on_gate_emit_fn)(int64_t id, void *data, void *ud);
typedef void (*on_gate_drop_fn)(void *data);

typedef struct on_gate {
    int holding;
    on_gate_item_t *held; /* sorted by id ascending, from `first` on */
    size_t first, nheld, cap;
    on_idset_t rows; /* ids of the rows merged so far */
} on_gate_t;

/* An idle gate (lets everything through). No allocation. */
void on_gate_init(on_gate_t *g);
/* Starts holding live items (a read of the outbox begins). */
void on_gate_hold(on_gate_t *g);
/* Non-zero while holding. */
int on_gate_holding(const on_gate_t *g);
/* on_gate_live: a copy of a row merged already (the caller keeps `data` and drops it). */
#define ON_GATE_DUP 2

/*
 * A live item. Returns 1 when it may go now (not holding; `data` stays the caller's), 0 when
 * held (the gate owns `data`), ON_GATE_DUP, or UV_ENOMEM (the caller keeps `data`).
 */
int on_gate_live(on_gate_t *g, int64_t id, void *data);
/*
 * A row of the outbox read (rows in ascending id order) is about to be sent: releases through
 * `emit` the held items with a lower id, in id order, and drops held copies of the row itself.
 * Returns 1 when the row should be sent, 0 when it was merged already (a repeated row), or
 * UV_ENOMEM (the row should still be sent).
 */
int on_gate_row(on_gate_t *g, int64_t id, on_gate_emit_fn emit, on_gate_drop_fn drop, void *ud);
/* The read is over: releases every held item in id order (copies of rows dropped) and lets
 * everything through again. */
void on_gate_release(on_gate_t *g, on_gate_emit_fn emit, on_gate_drop_fn drop, void *ud);
/* Frees what is held (through `drop`, may be NULL) and returns to idle. */
void on_gate_free(on_gate_t *g, on_gate_drop_fn drop);

#endif
