/*
 * fuzz/fuzz.h: what the libFuzzer targets share.
 *
 * Every target is one LLVMFuzzerTestOneInput; an invariant that does not hold calls
 * FUZZ_CHECK's abort() so that libFuzzer keeps the input as a crash, like a sanitizer report.
 * The network targets (HTTP, WebSocket, SSE sessions) run a real cm_http server on 127.0.0.1
 * in the target's own libuv loop and talk to it over a loopback TCP connection per input
 * (cm_http accepts TCP connections only): see fuzz_exchange().
 */
#ifndef FUZZ_FUZZ_H
#define FUZZ_FUZZ_H

#include "cm/http.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <uv.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Aborts with the failed condition when `cond` is false (an invariant, not a sanitizer). */
#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);           \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* FNV-1a of the input: what derives the per-input choices (how the bytes are cut into writes)
 * without spending input bytes on them, so that seeds stay plain protocol text. */
uint64_t fuzz_hash(const uint8_t *data, size_t size);

/* Sets the log level to debug, written to /dev/null: the log lines about malformed input are
 * built (and so fuzzed) without flooding libFuzzer's output. */
void fuzz_quiet_logs(void);

/*
 * One connection to the server listening on 127.0.0.1:`port` in `loop`: writes `prefix`
 * (`plen` bytes, may be 0) and then `data`, in writes cut at places chosen by `seed` (one
 * write, or pieces of 1 to 64 bytes with loop turns in between, so that the server's parser
 * also sees its input split), reads and drops whatever the server answers, half-closes, and
 * runs the loop until the server has closed the connection and released it
 * (cm_http_server_connections() back to 0). A server that has not closed it 5 s after the
 * client's FIN is a bug: abort().
 */
void fuzz_exchange(uv_loop_t *loop, cm_http_server_t *srv, int port, const void *prefix,
                   size_t plen, const uint8_t *data, size_t size, uint64_t seed);

#endif
