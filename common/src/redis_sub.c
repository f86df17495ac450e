/*
 * redis_sub.c: pub/sub of the Redis client (cm/redis.h): the remembered subscriptions, sent
 * again on every link that comes up, and the dispatch of channel messages to their callbacks.
 */
#include <string.h>
#include <strings.h>

#include "cm/alloc.h"
#include "redis_internal.h"

static uint32_t chan_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h % SUB_BUCKETS;
}

static sub_t **sub_find(cm_redis_t *r, const char *channel)
{
    sub_t **pp = &r->subs[chan_hash(channel)];
    while (*pp && strcmp((*pp)->channel, channel) != 0)
        pp = &(*pp)->next;
    return pp;
}

/* A channel message or (un)subscribe confirmation on a subscribed connection. */
void redis_on_sub_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    cm_redis_t *r = privdata;
    redisReply *rep = reply;
    if (ac != r->ac || r->closing)
        return;
    if (!rep) {
        redis_link_lost(r, ac, ac->errstr);
        return;
    }
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 3 ||
        rep->element[0]->type != REDIS_REPLY_STRING || rep->element[1]->type != REDIS_REPLY_STRING)
        return;
    const char *kind = rep->element[0]->str;
    const char *channel = rep->element[1]->str;
    if (strcasecmp(kind, "message") == 0) {
        redisReply *payload = rep->element[2];
        if (payload->type != REDIS_REPLY_STRING)
            return;
        for (sub_t *s = r->subs[chan_hash(channel)]; s; s = s->next) {
            if (strcmp(s->channel, channel) == 0) {
                s->cb(r, channel, payload->str, payload->len, s->ud);
                break;
            }
        }
    } else if (strcasecmp(kind, "subscribe") == 0 && strcmp(channel, HEALTH_CHANNEL) == 0) {
        redis_probe_acked(r);
    }
}

void redis_issue_subscriptions(cm_redis_t *r)
{
    /* One SUBSCRIBE per channel keeps this allocation-free and never too long. */
    for (int b = 0; b < SUB_BUCKETS; b++)
        for (sub_t *s = r->subs[b]; s; s = s->next) {
            const char *argv[2] = {"SUBSCRIBE", s->channel};
            redisAsyncCommandArgv(r->ac, redis_on_sub_reply, r, 2, argv, NULL);
        }
}

int cm_redis_subscribe(cm_redis_t *r, const char *channel, cm_redis_message_fn cb, void *ud)
{
    if (!r || !channel || !*channel || !cb || r->closing)
        return UV_EINVAL;
    sub_t **pp = sub_find(r, channel);
    if (*pp)
        return UV_EEXIST;
    size_t len = strlen(channel);
    sub_t *s = cm_malloc(sizeof *s + len + 1);
    if (!s)
        return UV_ENOMEM;
    s->next = NULL;
    s->cb = cb;
    s->ud = ud;
    memcpy(s->channel, channel, len + 1);
    *pp = s;
    r->sub_count++;
    if (r->link == LINK_UP) {
        const char *argv[2] = {"SUBSCRIBE", s->channel};
        redisAsyncCommandArgv(r->ac, redis_on_sub_reply, r, 2, argv, NULL);
    }
    return 0;
}

int cm_redis_unsubscribe(cm_redis_t *r, const char *channel)
{
    if (!r || !channel)
        return UV_ENOENT;
    sub_t **pp = sub_find(r, channel);
    sub_t *s = *pp;
    if (!s)
        return UV_ENOENT;
    *pp = s->next;
    r->sub_count--;
    if (r->link == LINK_UP && !r->closing) {
        const char *argv[2] = {"UNSUBSCRIBE", s->channel};
        redisAsyncCommandArgv(r->ac, redis_on_sub_reply, r, 2, argv, NULL);
    }
    cm_free(s);
    return 0;
}

void redis_subs_free(cm_redis_t *r)
{
    for (int b = 0; b < SUB_BUCKETS; b++) {
        sub_t *s = r->subs[b];
        while (s) {
            sub_t *next = s->next;
            cm_free(s);
            s = next;
        }
        r->subs[b] = NULL;
    }
    r->sub_count = 0;
}
