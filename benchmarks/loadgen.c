/*
 * loadgen.c: single-threaded epoll load generator for WebSocket fan-out servers.
 *
 * One process is both the subscribers (N WebSocket connections) and the publisher
 * (K keep-alive HTTP/1.1 connections), so it knows exactly which frames each
 * subscriber should get and counts lost / out-of-order / duplicate frames exactly.
 *
 * Cheap by design so it is never the bottleneck: level-triggered epoll, one large
 * shared read buffer, only WebSocket headers are parsed, plus a memmem() for
 * "seq": and "t": in each data frame. No JSON parsing, no allocations per frame.
 *
 * Control protocol (stdin/stdout, one line each): after all connections are
 * joined it prints {"phase":"connected",...} and waits. "go" runs one publish
 * phase and prints {"phase":"result",...}; "quit" or EOF exits. The runner reads
 * the server's CPU/RSS from /proc exactly around each phase.
 *
 * Build: gcc -O2 -o benchmarks/build/loadgen benchmarks/loadgen.c -lz   (see --help)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

enum { T_PUSH, T_NCHAN, T_WS };
enum { S_IDLE, S_CONNECTING, S_HANDSHAKE, S_JOINING, S_OPEN, S_DEAD };
enum { EV_SUB = 1, EV_HTTP = 2, EV_STDIN = 3, EV_PUBLISHERS = 4 };

#define RBUF_SIZE (1 << 20)      /* shared read buffer: big reads, few syscalls */
#define MAX_PENDING (256 * 1024) /* largest partial frame/handshake kept per connection */

/* ---------- configuration ---------- */
static struct {
    int target;
    const char *host;
    int port;
    const char *sub_path, *pub_path, *tokens_file, *key;
    const char *fields_file;  /* JSON object members sent beside seq, p and t instead of a pad */
    long conns, rooms, inflight_connects;
    long topics_per_conn;   /* push: connection i joins rooms (i*J + j) % R, j < J (default 1) */
    long messages;          /* 0 = unlimited (then --seconds bounds it) */
    double seconds;         /* 0 = unlimited (then --messages bounds it) */
    double rate;            /* messages/s, 0 = max rate */
    long http_conns, max_inflight, batch, frame_bytes;
    int hold, room_serial, deflate, text_pad;
    double heartbeat, drain_timeout, connect_timeout;
    long latency_samples;
    uint64_t seed;
} cfg = {
    .host = "127.0.0.1", .rooms = 1, .topics_per_conn = 1, .inflight_connects = 200, .http_conns = 4, .max_inflight = 16,
    .frame_bytes = 200, .room_serial = 0, .heartbeat = -1, .drain_timeout = 10, .connect_timeout = 300,
    .latency_samples = 4000000, .seed = 0x9e3779b97f4a7c15ULL,
};

/* ---------- state ---------- */
/* What one connection knows about one of its rooms (--topics-per-conn: several per connection). */
typedef struct {
    uint32_t room;
    uint32_t nwords;
    uint32_t *last_seq;         /* per publisher connection: the highest seq seen from it; a lower,
                                   new seq from the same connection is out of order */
    uint64_t *bits;             /* received-seq bitmap, exact dup/loss accounting */
} Slot;

typedef struct {
    int fd;
    uint8_t state, retries;
    uint16_t join_oks;          /* push: ok replies received so far (joined at --topics-per-conn) */
    Slot first;                 /* slot 0 lives here; slots 1..J-1 in xslots */
    char *pend;                 /* partial frame carried to the next read */
    uint32_t npend, cappend;
    double last_send;           /* for Phoenix heartbeats */
} Sub;

typedef struct {
    uint32_t next_seq, live, busy;  /* busy: an HTTP publish to this room is in flight */
    uint32_t *ids;                  /* ids[seq-1] = message index */
    uint32_t nids, capids;
} Room;

typedef struct {
    uint32_t room, seq;
    int32_t remaining;  /* subscribers that still have to receive it */
    int32_t slot;       /* index in the in-flight list, -1 if not there */
    uint32_t expected;
} Msg;

typedef struct {
    int fd, busy, read_to_close;
    char *out; size_t outlen, outoff, outcap;
    char *in; size_t inlen, incap;
    uint32_t first_msg, nmsg;       /* messages carried by the request in flight */
    uint32_t rooms_held[128]; int nrooms_held;
} Http;

static Sub *subs;
static Slot *xslots;                     /* slot j >= 1 of connection i: xslots[i*(J-1) + j-1] */
static char *connect_req; static size_t connect_req_cap;  /* upgrade request + J join frames */
static Room *rooms;
static Msg *msgs; static size_t nmsgs, capmsgs;
static uint32_t *inflight; static size_t ninflight, capinflight;
static Http *https;
static char **tokens; static long ntokens;
static char *rbuf;
static int ep;
static int pep = -1;                     /* open loop: the publishers' own epoll set (in ep as one fd) */
static struct sockaddr_in addr;          /* publisher (and default subscriber) address */
static struct sockaddr_in sub_addrs[16];  /* --sub-ports: subscriber i uses port i % count */
static int nsub_addrs;
static char *pad; static long pad_len;
static uint64_t rng;

/* counters of the current phase */
static struct {
    long joined, failed, connect_errors, next_connect, pending_connects;
    double t_connect_start;
    long published, requests, http_errors, http_reconnects, non2xx, first_bad_status, refused;
    long expected, received, duplicates, out_of_order, other_frames, unknown_frames;
    long server_closes, disconnects, write_errors, pings;
    long long frame_bytes;
    double t_go, t_last_progress, t_last_event, next_due;
    int publishing, stalled;
    float *lat; long nlat; long long lat_seen; double lat_max, lat_sum;
} st;

static enum { P_CONNECT, P_WAIT, P_PUBLISH, P_QUIT } phase = P_CONNECT;

/* ---------- helpers ---------- */
static double now_s(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
static long long now_ns(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static double cpu_s(void) {
    struct rusage ru; getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}
static uint64_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
static void die(const char *fmt, ...) {
    va_list ap; va_start(ap, fmt); fprintf(stderr, "loadgen: "); vfprintf(stderr, fmt, ap);
    fputc('\n', stderr); va_end(ap); exit(2);
}
static void *xrealloc(void *p, size_t n) { p = realloc(p, n); if (!p && n) die("out of memory"); return p; }
static void ep_set(int op, int fd, uint32_t events, int type, uint32_t idx) {
    struct epoll_event ev = { .events = events, .data.u64 = ((uint64_t)type << 32) | idx };
    int set = type == EV_HTTP && pep >= 0 ? pep : ep;
    if (epoll_ctl(set, op, fd, &ev) < 0 && op != EPOLL_CTL_DEL) die("epoll_ctl: %s", strerror(errno));
}
/* Append to a growable buffer. */
static void buf_put(char **b, size_t *len, size_t *cap, const char *src, size_t n) {
    if (*len + n > *cap) { *cap = (*len + n) * 2 + 256; *b = xrealloc(*b, *cap); }
    memcpy(*b + *len, src, n); *len += n;
}
/* Expand "{room}" and "{token}" in a path template. */
static void expand(char *dst, size_t cap, const char *tpl, long room, const char *token) {
    size_t o = 0;
    for (const char *p = tpl; *p && o + 1 < cap;) {
        if (!strncmp(p, "{room}", 6)) { o += snprintf(dst + o, cap - o, "%ld", room); p += 6; }
        else if (!strncmp(p, "{token}", 7)) { o += snprintf(dst + o, cap - o, "%s", token ? token : ""); p += 7; }
        else dst[o++] = *p++;
        if (o >= cap) o = cap - 1;
    }
    dst[o] = 0;
}

/* ---------- subscribers ---------- */
static inline Slot *sub_slot(long i, long j) {
    return j == 0 ? &subs[i].first : &xslots[(size_t)i * (size_t)(cfg.topics_per_conn - 1) + (size_t)(j - 1)];
}
/* Connection i's slot for room r, or NULL if it is not in r. Slot j holds room (i*J + j) % R. */
static inline Slot *slot_of_room(long i, uint32_t r) {
    if (cfg.topics_per_conn == 1) return subs[i].first.room == r ? &subs[i].first : NULL;
    uint64_t base = ((uint64_t)i * (uint64_t)cfg.topics_per_conn) % (uint64_t)cfg.rooms;
    uint64_t j = ((uint64_t)r + (uint64_t)cfg.rooms - base) % (uint64_t)cfg.rooms;
    if (j >= (uint64_t)cfg.topics_per_conn) return NULL;
    Slot *sl = sub_slot(i, (long)j);
    return sl->room == r ? sl : NULL;
}
static int sub_send(Sub *s, const void *buf, size_t len) {
    /* Tiny control frames on an almost empty socket: a short write means trouble, count it. */
    ssize_t n = send(s->fd, buf, len, MSG_NOSIGNAL);
    if (n != (ssize_t)len) { st.write_errors++; return -1; }
    s->last_send = now_s();
    return 0;
}
/* Client frames must be masked; an all-zero mask is valid and leaves the payload as is. */
static int sub_send_frame(Sub *s, int opcode, const char *payload, size_t len) {
    char frame[256];
    if (len > 125) return -1;
    frame[0] = (char)(0x80 | opcode); frame[1] = (char)(0x80 | len);
    memset(frame + 2, 0, 4); memcpy(frame + 6, payload, len);
    return sub_send(s, frame, 6 + len);
}

static void start_connect(long i);

/* A connection went away: it no longer owes frames for messages still in flight. */
static void complete_msg(uint32_t id);
static void sub_close(long i, int during_connect) {
    Sub *s = &subs[i];
    if (s->fd >= 0) { close(s->fd); s->fd = -1; }
    if (s->state == S_OPEN) {
        for (long j = 0; j < cfg.topics_per_conn; j++) rooms[sub_slot(i, j)->room].live--;
        for (size_t k = 0; k < ninflight;) {
            Msg *m = &msgs[inflight[k]];
            Slot *sl = slot_of_room(i, m->room);
            uint32_t w = (m->seq) >> 6;
            int have = sl && w < sl->nwords && (sl->bits[w] >> (m->seq & 63) & 1);
            if (sl && !have && --m->remaining == 0) { complete_msg(inflight[k]); continue; }
            k++;
        }
    } else if (during_connect && s->state != S_DEAD && s->state != S_IDLE) {
        st.pending_connects--;
        st.connect_errors++;
        if (s->retries++ < 3) { s->state = S_IDLE; start_connect(i); return; }
        st.failed++;
    }
    s->state = S_DEAD;
}

static void start_connect(long i) {
    Sub *s = &subs[i];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s (raise the fd limit?)", strerror(errno));
    int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->fd = fd; s->state = S_CONNECTING; s->npend = 0; s->join_oks = 0;
    st.pending_connects++;
    struct sockaddr_in *to = nsub_addrs ? &sub_addrs[i % nsub_addrs] : &addr;
    if (connect(fd, (struct sockaddr *)to, sizeof *to) < 0 && errno != EINPROGRESS) {
        static int warned; if (!warned++) fprintf(stderr, "loadgen: connect: %s\n", strerror(errno));
        sub_close(i, 1);
        return;
    }
    ep_set(EPOLL_CTL_ADD, fd, EPOLLOUT, EV_SUB, (uint32_t)i);
}

/* Connected: send the upgrade request (push: with the phx_join frame pipelined behind it). */
static void sub_on_connected(long i) {
    Sub *s = &subs[i];
    int err = 0; socklen_t el = sizeof err;
    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err) {
        static int warned; if (!warned++) fprintf(stderr, "loadgen: connect: %s\n", strerror(err));
        sub_close(i, 1); return;
    }
    char path[4096], *req = connect_req;
    expand(path, sizeof path, cfg.sub_path, s->first.room, ntokens ? tokens[i % ntokens] : NULL);
    int n = snprintf(req, 8192,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
                     path, cfg.host, cfg.port, cfg.deflate ? "Sec-WebSocket-Extensions: permessage-deflate\r\n" : "");
    if (cfg.target == T_PUSH) {
        /* One phx_join per room, a distinct ref each; joined once all of them are answered ok. */
        for (long j = 0; j < cfg.topics_per_conn; j++) {
            char join[160];
            int jl = snprintf(join, sizeof join, "[\"%ld\",\"%ld\",\"room:lobby:r%u\",\"phx_join\",{}]",
                              j + 1, j + 1, sub_slot(i, j)->room);
            req[n++] = (char)0x81; req[n++] = (char)(0x80 | jl); memset(req + n, 0, 4); n += 4;
            memcpy(req + n, join, jl); n += jl;
        }
    }
    if (sub_send(s, req, n) < 0) { sub_close(i, 1); return; }
    s->state = S_HANDSHAKE;
    ep_set(EPOLL_CTL_MOD, s->fd, EPOLLIN, EV_SUB, (uint32_t)i);
}

static void sub_joined(long i) {
    Sub *s = &subs[i];
    s->state = S_OPEN;
    for (long j = 0; j < cfg.topics_per_conn; j++) rooms[sub_slot(i, j)->room].live++;
    st.joined++; st.pending_connects--;
    st.t_last_event = now_s();
}

static void record_latency(double ms) {
    if (ms > st.lat_max) st.lat_max = ms;
    st.lat_sum += ms;
    st.lat_seen++;
    if (st.nlat < cfg.latency_samples) st.lat[st.nlat++] = (float)ms;
    else { /* reservoir sampling keeps a uniform sample of all deliveries */
        unsigned long long j = rnd() % (unsigned long long)st.lat_seen;
        if ((long long)j < cfg.latency_samples) st.lat[j] = (float)ms;
    }
}

static void complete_msg(uint32_t id) {
    Msg *m = &msgs[id];
    if (m->slot < 0) return;
    uint32_t last = inflight[--ninflight];
    inflight[m->slot] = last; msgs[last].slot = m->slot;
    m->slot = -1;
}

/* --deflate: the head of one RFC 7692 message inflated into inflate_out (the server keeps no context, so
   neither do we: one z_stream, reset per message); (size_t)-1 when it is not deflate data. Only the head:
   "seq", "p" and "t" are in a frame's first bytes, and inflating 10,000 copies of each whole message
   would make the loader, not the server, the bottleneck (the tests check whole messages). */
static z_stream inflater; static int inflater_ready;
static char inflate_out[256];
static size_t inflate_message(const char *p, size_t len) {
    static const unsigned char tail[4] = {0, 0, 0xff, 0xff};
    if (!inflater_ready) { if (inflateInit2(&inflater, -15) != Z_OK) die("inflateInit2"); inflater_ready = 1; }
    else inflateReset(&inflater);
    inflater.next_out = (unsigned char *)inflate_out; inflater.avail_out = sizeof inflate_out;
    inflater.next_in = (unsigned char *)p; inflater.avail_in = (uInt)len;
    int rc = inflate(&inflater, Z_SYNC_FLUSH);
    if (rc != Z_OK && rc != Z_BUF_ERROR) return (size_t)-1;
    if (!inflater.avail_out) return sizeof inflate_out;  /* the head is all we read */
    inflater.next_in = (unsigned char *)tail; inflater.avail_in = 4;
    rc = inflate(&inflater, Z_SYNC_FLUSH);
    if ((rc != Z_OK && rc != Z_BUF_ERROR) || inflater.avail_in) return (size_t)-1;
    return sizeof inflate_out - inflater.avail_out;
}

/* One complete data frame for subscriber i: find "seq": and "t": and do the bookkeeping. */
static void on_data_frame(long i, const char *p, size_t len, size_t wire_len, long long t_read) {
    Sub *s = &subs[i];
    const char *q = memmem(p, len, "\"seq\":", 6);
    if (!q) { st.other_frames++; return; }
    const char *end = p + len;
    q += 6;
    uint64_t seq = 0;
    while (q < end && *q >= '0' && *q <= '9') seq = seq * 10 + (uint64_t)(*q++ - '0');
    size_t rest = q < end ? (size_t)(end - q) : 0;
    const char *tq = rest ? memmem(q, rest, "\"t\":", 4) : NULL;
    long long t = 0;
    if (tq) for (tq += 4; tq < end && *tq >= '0' && *tq <= '9'; tq++) t = t * 10 + (*tq - '0');
    Slot *sl = &s->first;
    if (cfg.topics_per_conn > 1) {
        /* Several rooms on this connection: the topic names the slot. Push frames start
           [null,null,"room:lobby:r<k>", ...; look only in the first bytes. */
        const char *tp = memmem(p, len < 64 ? len : 64, "\"room:lobby:r", 13);
        uint64_t k = 0;
        if (tp) for (tp += 13; tp < end && *tp >= '0' && *tp <= '9'; tp++) k = k * 10 + (uint64_t)(*tp - '0');
        sl = tp && k < (uint64_t)cfg.rooms ? slot_of_room(i, (uint32_t)k) : NULL;
        if (!sl) { st.unknown_frames++; return; }
    }
    Room *r = &rooms[sl->room];
    if (seq == 0 || seq > r->nids) { st.unknown_frames++; return; }
    uint32_t w = (uint32_t)(seq >> 6);
    if (w >= sl->nwords) {
        uint32_t nw = sl->nwords ? sl->nwords : 4;
        while (nw <= w) nw *= 2;
        sl->bits = xrealloc(sl->bits, nw * sizeof(uint64_t));
        memset(sl->bits + sl->nwords, 0, (nw - sl->nwords) * sizeof(uint64_t));
        sl->nwords = nw;
    }
    uint64_t bit = 1ULL << (seq & 63);
    if (sl->bits[w] & bit) { st.duplicates++; return; }
    sl->bits[w] |= bit;
    st.received++;
    st.frame_bytes += (long long)wire_len;  /* as on the wire: compressed, when it came compressed */
    /* Order is promised per publisher connection (its requests are sequential); two connections'
       publishes to one room may legally cross. "p":K right behind the seq names the connection. */
    long pub = 0;
    if (rest > 5 && !memcmp(q, ",\"p\":", 5))
        for (const char *pq = q + 5; pq < end && *pq >= '0' && *pq <= '9'; pq++) pub = pub * 10 + (*pq - '0');
    if (pub >= cfg.http_conns) pub = 0;
    if (seq < sl->last_seq[pub]) st.out_of_order++; else sl->last_seq[pub] = (uint32_t)seq;
    Msg *m = &msgs[r->ids[seq - 1]];
    if (m->remaining > 0 && --m->remaining == 0) complete_msg(r->ids[seq - 1]);
    if (t) record_latency((t_read - t) / 1e6);
    st.t_last_progress = st.t_last_event = t_read * 1e-9;
}

static void sub_on_readable(long i) {
    Sub *s = &subs[i];
    size_t have = s->npend;
    if (have) memcpy(rbuf, s->pend, have);
    ssize_t n = recv(s->fd, rbuf + have, RBUF_SIZE - have, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) {
        if (s->state == S_OPEN) st.disconnects++;
        else if (s->state != S_DEAD) {
            static int warned; if (!warned++) fprintf(stderr, "loadgen: connection closed during handshake/join\n");
        }
        sub_close(i, s->state != S_OPEN);
        return;
    }
    long long t_read = now_ns();  /* one timestamp per read: every frame in it had arrived by now */
    size_t total = have + (size_t)n, off = 0;
    if (s->state == S_HANDSHAKE) {
        char *e = memmem(rbuf, total, "\r\n\r\n", 4);
        if (!e) goto keep;
        if (strncmp(rbuf, "HTTP/1.1 101", 12)) {
            static int warned;
            if (!warned++) fprintf(stderr, "loadgen: upgrade refused: %.*s\n", (int)(strcspn(rbuf, "\r")), rbuf);
            sub_close(i, 1); return;
        }
        off = (size_t)(e - rbuf) + 4;
        if (cfg.target == T_PUSH) s->state = S_JOINING; else sub_joined(i);
    }
    while (total - off >= 2) {
        unsigned char b0 = (unsigned char)rbuf[off], b1 = (unsigned char)rbuf[off + 1];
        uint64_t len = b1 & 0x7f; size_t hdr = 2;
        if (len == 126) {
            if (total - off < 4) break;
            len = ((unsigned char)rbuf[off + 2] << 8) | (unsigned char)rbuf[off + 3]; hdr = 4;
        } else if (len == 127) {
            if (total - off < 10) break;
            len = 0; for (int k = 0; k < 8; k++) len = (len << 8) | (unsigned char)rbuf[off + 2 + k];
            hdr = 10;
        }
        if (b1 & 0x80) hdr += 4;  /* servers must not mask, but skip a mask key if one is there */
        if (hdr + len > MAX_PENDING) { fprintf(stderr, "loadgen: frame of %llu bytes too large\n",
                                               (unsigned long long)len); sub_close(i, s->state != S_OPEN); return; }
        if (total - off < hdr + len) break;
        const char *payload = rbuf + off + hdr;
        int opcode = b0 & 0x0f;
        if (opcode == 1 || opcode == 2) {
            if (s->state == S_OPEN && (b0 & 0x40)) {
                size_t inflated = inflate_message(payload, len);
                if (inflated == (size_t)-1) { st.other_frames++; }
                else on_data_frame(i, inflate_out, inflated, len, t_read);
            } else if (s->state == S_OPEN) on_data_frame(i, payload, len, len, t_read);
            else if (s->state == S_JOINING) {
                /* The first J frames after the upgrade must be ok replies to the J phx_joins. */
                if (memmem(payload, len, "phx_reply", 9) && memmem(payload, len, "\"ok\"", 4)) {
                    if (++s->join_oks >= cfg.topics_per_conn) sub_joined(i);
                } else {
                    static int warned;
                    if (!warned++) fprintf(stderr, "loadgen: join failed: %.*s\n", (int)(len < 300 ? len : 300), payload);
                    sub_close(i, 1); return;
                }
            }
        } else if (opcode == 8) {
            st.server_closes++;
            static int warned;
            if (!warned++) fprintf(stderr, "loadgen: server sent close frame (code %d)\n",
                                   len >= 2 ? ((unsigned char)payload[0] << 8 | (unsigned char)payload[1]) : 0);
            sub_close(i, s->state != S_OPEN); return;
        } else if (opcode == 9) {
            st.pings++;
            sub_send_frame(s, 0xA, payload, len);
        } /* 0xA pong and 0 continuation: nothing to do (servers here never fragment) */
        off += hdr + len;
    }
keep:
    s->npend = (uint32_t)(total - off);
    if (s->npend > MAX_PENDING) { fprintf(stderr, "loadgen: handshake too long\n"); sub_close(i, 1); return; }
    if (s->npend) {
        if (s->npend > s->cappend) { s->cappend = s->npend * 2; s->pend = xrealloc(s->pend, s->cappend); }
        memcpy(s->pend, rbuf + off, s->npend);
    }
}

/* ---------- HTTP publisher ---------- */
static void http_open(long k) {
    Http *h = &https[k];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS)
        die("publisher connect: %s", strerror(errno));
    h->fd = fd; h->busy = 0; h->inlen = 0; h->outlen = h->outoff = 0; h->read_to_close = 0;
    ep_set(EPOLL_CTL_ADD, fd, EPOLLIN, EV_HTTP, (uint32_t)k);
}

/* The request in flight on h is over (answered, or failed when ok < 0). */
static void http_finish(Http *h, int status) {
    int ok = status >= 200 && status < 300;
    st.requests++;
    if (!ok) {
        st.http_errors++;
        if (status > 0) { st.non2xx++; if (!st.first_bad_status) st.first_bad_status = status; }
        /* Refused (503: the server is behind): the messages were not accepted, so not lost either. */
        if (status == 503) st.refused += h->nmsg;
        /* The server refused these messages: nobody will get them, so expect none. */
        for (uint32_t j = 0; j < h->nmsg && cfg.conns; j++) {
            Msg *m = &msgs[h->first_msg + j];
            st.expected -= m->expected;
            m->expected = 0; m->remaining = 0; complete_msg(h->first_msg + j);
        }
    }
    for (int j = 0; j < h->nrooms_held; j++) rooms[h->rooms_held[j]].busy = 0;
    h->nrooms_held = 0; h->nmsg = 0; h->busy = 0;
    st.t_last_progress = st.t_last_event = now_s();
}

static void http_reset(long k, const char *why) {
    Http *h = &https[k];
    if (h->busy) {
        static int warned; if (!warned++) fprintf(stderr, "loadgen: publisher connection lost (%s)\n", why);
        http_finish(h, -1);
    }
    ep_set(EPOLL_CTL_DEL, h->fd, 0, EV_HTTP, (uint32_t)k);
    close(h->fd);
    st.http_reconnects++;
    http_open(k);
}

static void http_flush(long k) {
    Http *h = &https[k];
    while (h->outoff < h->outlen) {
        ssize_t n = send(h->fd, h->out + h->outoff, h->outlen - h->outoff, MSG_NOSIGNAL);
        if (n < 0 && errno == EAGAIN) { ep_set(EPOLL_CTL_MOD, h->fd, EPOLLIN | EPOLLOUT, EV_HTTP, (uint32_t)k); return; }
        if (n <= 0) { http_reset(k, strerror(errno)); return; }
        h->outoff += (size_t)n;
    }
    ep_set(EPOLL_CTL_MOD, h->fd, EPOLLIN, EV_HTTP, (uint32_t)k);
}

/* Parse one response at the start of h->in: 0 = need more, else bytes consumed; status/close out. */
static size_t http_parse(Http *h, int *status, int *conn_close, int at_eof) {
    char *in = h->in; size_t len = h->inlen;
    char *e = memmem(in, len, "\r\n\r\n", 4);
    if (!e) return 0;
    size_t body = (size_t)(e - in) + 4;
    *status = (len > 12 && !strncmp(in, "HTTP/1.", 7)) ? atoi(in + 9) : 0;
    long long clen = -1; int chunked = 0;
    *conn_close = !strncmp(in, "HTTP/1.0", 8);
    for (char *line = memchr(in, '\n', body); line && line < e; line = memchr(line, '\n', (size_t)(e - line))) {
        line++;
        size_t ll = (size_t)((char *)memchr(line, '\r', (size_t)(e + 2 - line)) - line);
        if (ll > 15 && !strncasecmp(line, "content-length:", 15)) clen = atoll(line + 15);
        else if (ll > 18 && !strncasecmp(line, "transfer-encoding:", 18) && memmem(line, ll, "chunked", 7)) chunked = 1;
        else if (ll > 11 && !strncasecmp(line, "connection:", 11)) {
            if (memmem(line, ll, "close", 5)) *conn_close = 1;
            else if (memmem(line, ll, "eep-alive", 9)) *conn_close = 0;
        }
    }
    if (chunked) {
        size_t pos = body;
        for (;;) {
            char *crlf = memmem(in + pos, len - pos, "\r\n", 2);
            if (!crlf) return 0;
            size_t size = strtoul(in + pos, NULL, 16);
            pos = (size_t)(crlf - in) + 2;
            if (size == 0) {  /* last chunk, then optional trailers and an empty line */
                if (len - pos >= 2 && in[pos] == '\r' && in[pos + 1] == '\n') return pos + 2;
                char *t = memmem(in + pos, len - pos, "\r\n\r\n", 4);
                return t ? (size_t)(t - in) + 4 : 0;
            }
            if (len - pos < size + 2) return 0;
            pos += size + 2;
        }
    }
    if (clen >= 0) return len - body >= (size_t)clen ? body + (size_t)clen : 0;
    if (*status == 204 || *status == 304 || (*status >= 100 && *status < 200)) return body;
    /* No length: the body runs to the end of the connection. */
    *conn_close = 1;
    return at_eof ? len : 0;
}

static void http_on_readable(long k) {
    Http *h = &https[k];
    if (h->incap - h->inlen < 65536) { h->incap = h->inlen + 131072; h->in = xrealloc(h->in, h->incap); }
    ssize_t n = recv(h->fd, h->in + h->inlen, h->incap - h->inlen, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    int at_eof = n <= 0;
    if (n > 0) h->inlen += (size_t)n;
    for (;;) {
        int status = 0, conn_close = 0;
        size_t used = h->inlen ? http_parse(h, &status, &conn_close, at_eof) : 0;
        if (!used) break;
        memmove(h->in, h->in + used, h->inlen - used); h->inlen -= used;
        if (status >= 100 && status < 200) continue;
        if (h->busy) http_finish(h, status);
        if (conn_close) { http_reset(k, "server closed"); return; }
    }
    /* Idle keep-alive connections may be closed by the server: reopen quietly. */
    if (at_eof) http_reset(k, n == 0 ? "EOF" : strerror(errno));
}

/* Appends one message's JSON payload; seq/t are what the subscribers look for. */
static char *fields;  /* --fields-file's contents, or NULL */
static int payload_json(char *dst, size_t cap, uint32_t seq, long k, long long t) {
    if (fields) return snprintf(dst, cap, "{\"seq\":%u,\"p\":%ld,\"t\":%lld,%s}", seq, k, t, fields);
    return snprintf(dst, cap, "{\"seq\":%u,\"p\":%ld,\"t\":%lld,\"pad\":\"%s\"}", seq, k, t, pad);
}

/* Reserve the next seq of room r and remember what the subscribers should receive. */
static uint32_t new_msg(uint32_t r, uint32_t *seq_out) {
    Room *room = &rooms[r];
    uint32_t seq = ++room->next_seq;
    *seq_out = seq;
    if (!cfg.conns) return 0;
    if (nmsgs == capmsgs) { capmsgs = capmsgs ? capmsgs * 2 : 65536; msgs = xrealloc(msgs, capmsgs * sizeof(Msg)); }
    uint32_t id = (uint32_t)nmsgs++;
    Msg *m = &msgs[id];
    m->room = r; m->seq = seq; m->expected = room->live; m->remaining = (int32_t)room->live; m->slot = -1;
    if (room->nids == room->capids) {
        room->capids = room->capids ? room->capids * 2 : 64;
        room->ids = xrealloc(room->ids, room->capids * sizeof(uint32_t));
    }
    room->ids[room->nids++] = id;
    st.expected += room->live;
    if (m->remaining > 0) {
        if (ninflight == capinflight) { capinflight = capinflight ? capinflight * 2 : 1024;
                                        inflight = xrealloc(inflight, capinflight * sizeof(uint32_t)); }
        m->slot = (int32_t)ninflight; inflight[ninflight++] = id;
    }
    return id;
}

static uint32_t pick_room(long k) {
    /* Random room; with room-serial, one with no publish in flight on another connection, so
       the server cannot legally reorder two messages of one room and out_of_order means something. */
    for (int tries = 0; tries < 16; tries++) {
        uint32_t r = (uint32_t)(rnd() % (uint64_t)cfg.rooms);
        if (!cfg.room_serial || !cfg.conns || !rooms[r].busy || rooms[r].busy == (uint32_t)k + 1) return r;
    }
    return UINT32_MAX;
}

/* Build and send one request (one message, or --batch messages) on idle connection k. */
static int publish_one(long k, double now) {
    Http *h = &https[k];
    long count = cfg.batch > 0 ? cfg.batch : 1;
    if (cfg.messages && st.published + count > cfg.messages) count = cfg.messages - st.published;
    static char body[1 << 22];
    char path[1024], item[4096];
    size_t bl = 0;
    uint32_t first = (uint32_t)nmsgs;
    uint32_t r0 = pick_room(k);
    if (r0 == UINT32_MAX) return 0;
    h->nrooms_held = 0;
    if (cfg.batch > 0) bl += (size_t)snprintf(body, sizeof body, "{\"messages\":[");
    for (long j = 0; j < count; j++) {
        uint32_t r = j == 0 ? r0 : pick_room(k);
        if (r == UINT32_MAX) break;
        uint32_t seq;
        new_msg(r, &seq);
        if (cfg.room_serial && cfg.conns) {
            if (!rooms[r].busy && h->nrooms_held < 128) h->rooms_held[h->nrooms_held++] = r;
            rooms[r].busy = (uint32_t)k + 1;
        }
        int pl = payload_json(item, sizeof item, seq, k, now_ns());
        if (cfg.target == T_PUSH) {
            char wrap[4600];
            int wl = snprintf(wrap, sizeof wrap, "%s{\"topic\":\"room:lobby:r%u\",\"event\":\"m\",\"payload\":%.*s}",
                              j ? "," : "", r, pl, item);
            memcpy(body + bl, wrap, (size_t)wl); bl += (size_t)wl;
        } else { memcpy(body + bl, item, (size_t)pl); bl += (size_t)pl; }
        st.published++;
        if (j == 0) expand(path, sizeof path, cfg.pub_path, r, NULL);
        if (cfg.batch == 0) break;
        if (h->nrooms_held == 128) { count = j + 1; break; }
    }
    if (cfg.batch > 0) { body[bl++] = ']'; body[bl++] = '}'; }
    h->first_msg = first; h->nmsg = (uint32_t)(nmsgs - first);
    char head[1024];
    int hl = snprintf(head, sizeof head,
                      "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n%s%s%s"
                      "Content-Length: %zu\r\n\r\n",
                      path, cfg.host, cfg.port, cfg.key ? "Authorization: Bearer " : "", cfg.key ? cfg.key : "",
                      cfg.key ? "\r\n" : "", bl);
    h->outlen = h->outoff = 0;
    buf_put(&h->out, &h->outlen, &h->outcap, head, (size_t)hl);
    buf_put(&h->out, &h->outlen, &h->outcap, body, bl);
    h->busy = 1;
    st.t_last_progress = now;
    http_flush(k);
    return 1;
}

static int publish_done(double now) {
    if (cfg.messages && st.published >= cfg.messages) return 1;
    if (cfg.seconds > 0 && now - st.t_go >= cfg.seconds) return 1;
    return 0;
}

static void try_publish(double now) {
    if (!st.publishing) return;
    if (now - st.t_last_progress > cfg.drain_timeout) { st.stalled = 1; st.publishing = 0; return; }
    for (long k = 0; k < cfg.http_conns; k++) {
        if (https[k].busy) continue;
        if (publish_done(now)) { st.publishing = 0; return; }
        long count = cfg.batch > 0 ? cfg.batch : 1;
        if (cfg.rate > 0) {
            if (now < st.next_due) return;
        } else if (cfg.conns && cfg.max_inflight > 0 && ninflight + (size_t)count > (size_t)cfg.max_inflight
                   && ninflight > 0) {
            /* Backlog bound: wait until earlier messages reached all their subscribers. */
            if (now - st.t_last_progress > cfg.drain_timeout) { st.stalled = 1; st.publishing = 0; }
            return;
        }
        if (!publish_one(k, now)) return;
        if (cfg.rate > 0) {
            st.next_due += (cfg.batch > 0 ? cfg.batch : 1) / cfg.rate;
        }
    }
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b; return (x > y) - (x < y);
}

static void print_result(double t_end, double cpu) {
    double elapsed = t_end - st.t_go;
    if (elapsed <= 0) elapsed = 1e-9;
    double p50 = 0, p99 = 0;
    if (st.nlat) {
        qsort(st.lat, (size_t)st.nlat, sizeof(float), cmp_float);
        p50 = st.lat[(size_t)((st.nlat - 1) * 0.50)];
        p99 = st.lat[(size_t)((st.nlat - 1) * 0.99)];
    }
    long lost = st.expected - st.received;
    printf("{\"phase\":\"result\",\"target\":\"%s\",\"conns\":%ld,\"rooms\":%ld,\"topics_per_conn\":%ld,\"published\":%ld,\"requests\":%ld,"
           "\"http_errors\":%ld,\"non_2xx\":%ld,\"first_bad_status\":%ld,\"refused\":%ld,\"http_reconnects\":%ld,"
           "\"frames_expected\":%ld,\"frames_received\":%ld,\"lost\":%ld,\"out_of_order\":%ld,\"duplicates\":%ld,"
           "\"other_frames\":%ld,\"unknown_frames\":%ld,\"server_closes\":%ld,\"disconnects\":%ld,"
           "\"write_errors\":%ld,\"pings\":%ld,\"stalled\":%s,\"elapsed\":%.4f,\"deliveries_per_s\":%.1f,"
           "\"requests_per_s\":%.1f,\"messages_per_s\":%.1f,\"avg_frame_bytes\":%.1f,"
           "\"latency_ms\":{\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f,\"mean\":%.3f,\"samples\":%ld,\"seen\":%lld},"
           "\"cpu_s\":%.4f,\"cpu_pct\":%.1f}\n",
           cfg.target == T_PUSH ? "push" : cfg.target == T_NCHAN ? "nchan" : "ws", cfg.conns, cfg.rooms, cfg.topics_per_conn,
           st.published, st.requests, st.http_errors, st.non2xx, st.first_bad_status, st.refused, st.http_reconnects,
           st.expected, st.received, lost, st.out_of_order, st.duplicates, st.other_frames, st.unknown_frames,
           st.server_closes, st.disconnects, st.write_errors, st.pings, st.stalled ? "true" : "false", elapsed,
           st.received / elapsed, st.requests / elapsed, st.published / elapsed,
           st.received ? (double)st.frame_bytes / st.received : 0.0, p50, p99, st.lat_max,
           st.lat_seen ? st.lat_sum / st.lat_seen : 0.0, st.nlat, st.lat_seen, cpu, 100.0 * cpu / elapsed);
    fflush(stdout);
}

/* Open loop: answers are read and the next publishes sent between every few subscriber reads, as
   independent backends would, instead of waiting behind a whole batch of subscriber reads. */
static void serve_publishers(void) {
    struct epoll_event evs[64];
    int n = epoll_wait(pep, evs, 64, 0);
    for (int e = 0; e < n; e++) {
        uint32_t idx = (uint32_t)evs[e].data.u64;
        if (evs[e].events & EPOLLOUT) http_flush(idx);
        if (evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) http_on_readable(idx);
    }
    if (phase == P_PUBLISH) try_publish(now_s());
}

static double phase_cpu0;
static void begin_publish(void) {
    long keep_joined = st.joined;
    double t_connect = st.t_connect_start;
    float *lat = st.lat;
    memset(&st, 0, sizeof st);
    st.joined = keep_joined; st.t_connect_start = t_connect; st.lat = lat;
    st.t_go = st.t_last_progress = st.t_last_event = st.next_due = now_s();
    st.publishing = 1;
    phase_cpu0 = cpu_s();
    for (long k = 0; k < cfg.http_conns; k++) if (https[k].fd <= 0) http_open(k);
    phase = P_PUBLISH;
}

static void check_publish_end(double now) {
    if (st.publishing) return;
    for (long k = 0; k < cfg.http_conns; k++) if (https[k].busy) {
        if (now - st.t_last_progress > cfg.drain_timeout) { st.stalled = 1; break; }  /* unanswered request */
        return;
    }
    if (ninflight > 0 && now - st.t_last_progress <= cfg.drain_timeout) return;
    double cpu = cpu_s() - phase_cpu0;
    print_result(st.t_last_event > st.t_go ? st.t_last_event : now, cpu);
    /* Whatever never arrived is lost; do not let it block a following phase. */
    while (ninflight) complete_msg(inflight[ninflight - 1]);
    phase = P_WAIT;
}

static void on_stdin(void) {
    static char line[256]; static size_t ll;
    ssize_t n = read(0, line + ll, sizeof line - 1 - ll);
    if (n <= 0) { phase = P_QUIT; return; }
    ll += (size_t)n;
    char *nl;
    while ((nl = memchr(line, '\n', ll))) {
        *nl = 0;
        if (!strcmp(line, "quit")) phase = P_QUIT;
        else if (!strcmp(line, "go") && phase == P_WAIT && !cfg.hold) begin_publish();
        else if (!strcmp(line, "go")) fprintf(stderr, "loadgen: 'go' ignored (%s)\n", cfg.hold ? "--hold" : "busy");
        size_t used = (size_t)(nl - line) + 1;
        memmove(line, line + used, ll - used); ll -= used;
    }
    if (ll >= sizeof line - 1) ll = 0;
}

static void heartbeat_sweep(double now) {
    /* Phoenix closes sockets that stay silent for its heartbeat timeout (60 s by default). */
    static const char hb[] = "[null,\"hb\",\"phoenix\",\"heartbeat\",{}]";
    for (long i = 0; i < cfg.conns; i++)
        if (subs[i].state == S_OPEN && now - subs[i].last_send > cfg.heartbeat) sub_send_frame(&subs[i], 1, hb, sizeof hb - 1);
}

static void usage(void) {
    puts("usage: loadgen --target push|nchan|ws --port N [options]\n"
         "\n"
         "Connects --conns WebSocket subscribers (connection i joins room i % --rooms), prints\n"
         "{\"phase\":\"connected\",...} and waits for a line on stdin: 'go' runs one publish phase and\n"
         "prints {\"phase\":\"result\",...}; 'quit' or EOF exits. With --conns 0 the publish phase only\n"
         "hammers the publish endpoint (requests/s, non-2xx).\n"
         "\n"
         "target:\n"
         "  --target T            push (Phoenix v2 + /api/broadcast), nchan or ws\n"
         "  --host H --port N     server address (loopback only; default host 127.0.0.1)\n"
         "  --sub-path TPL        WebSocket path; {room} and {token} are replaced\n"
         "                        (push: /socket/websocket?vsn=2.0.0&token={token}; others: /sub/r{room})\n"
         "  --sub-ports P1,P2     subscribers connect to these ports in turn (publishes go to --port)\n"
         "  --pub-path TPL        publish path (push: /api/broadcast or /api/batch; others: /pub/r{room})\n"
         "  --tokens FILE         push: one JWT per line, connection i uses line i % count\n"
         "  --key KEY             publish key, sent as Authorization: Bearer KEY\n"
         "connections:\n"
         "  --conns N             subscribers (default 0)\n"
         "  --rooms R             rooms, connection i is in room i % R (default 1)\n"
         "  --topics-per-conn J   push: connection i joins the J rooms (i*J + j) % R, j = 0..J-1, one\n"
         "                        phx_join each, and counts as joined once all J replied ok (default 1;\n"
         "                        the server's PUSH_MAX_TOPICS_PER_CONNECTION must allow J)\n"
         "  --inflight-connects C connections being set up at once (default 200)\n"
         "  --connect-timeout S   give up on the connect phase after S seconds (default 300)\n"
         "  --heartbeat S         push: Phoenix heartbeat every S seconds per socket (default 30)\n"
         "  --hold                connect and report only; ignore 'go' (idle-memory runs)\n"
         "publish phase:\n"
         "  --messages M          stop after M messages (0 = no limit)\n"
         "  --seconds S           stop publishing after S seconds (0 = no limit)\n"
         "  --rate X              messages/s on a fixed schedule (0 = max rate, default)\n"
         "  --http-conns K        keep-alive HTTP connections, one request in flight each (default 4)\n"
         "  --max-inflight W      max rate: at most W messages published but not yet received by all\n"
         "                        their subscribers (default 16); 0 = open loop: each connection\n"
         "                        publishes again as soon as its answer comes, as independent backends do\n"
         "  --batch B             push: POST B messages per request to /api/batch\n"
         "  --room-serial         at most one publish per room in flight, so order is checked per\n"
         "                        room (default: per publisher connection; rooms take concurrent publishes)\n"
         "  --frame-bytes F       pad messages so the delivered frame is about F bytes (default 200)\n"
         "  --text-pad            pad with words (as chat text compresses) instead of x's\n"
         "  --fields-file F       instead of a pad, send the JSON object members in F (at most 3000 bytes)\n"
         "                        beside seq, p and t, e.g. a real application's message fields\n"
         "  --deflate             offer permessage-deflate and inflate compressed frames' first 256 bytes (-lz);\n"
         "                        avg_frame_bytes then counts the bytes on the wire\n"
         "  --drain-timeout S     after publishing, wait at most S seconds without progress (default 10)\n"
         "  --latency-samples N   reservoir size for latency percentiles (default 4000000)\n"
         "\n"
         "Every published payload is {\"seq\":N,\"t\":T,\"pad\":\"...\"}: N counts per room from 1 and T is\n"
         "CLOCK_MONOTONIC ns at send, so loss, duplicates, order and latency are exact.");
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define VAL() (i + 1 < argc ? argv[++i] : (die("%s needs a value", a), ""))
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(); return 0; }
        else if (!strcmp(a, "--target")) {
            const char *v = VAL();
            cfg.target = !strcmp(v, "push") ? T_PUSH : !strcmp(v, "nchan") ? T_NCHAN : !strcmp(v, "ws") ? T_WS : -1;
            if (cfg.target < 0) die("unknown target %s", v);
        }
        else if (!strcmp(a, "--host")) cfg.host = VAL();
        else if (!strcmp(a, "--port")) cfg.port = atoi(VAL());
        else if (!strcmp(a, "--sub-path")) cfg.sub_path = VAL();
        else if (!strcmp(a, "--sub-ports")) {
            /* Subscribers spread over several server nodes (scale-out); publishes still go to --port. */
            for (char *tok = strtok(strdup(VAL()), ","); tok && nsub_addrs < 16; tok = strtok(NULL, ","))
                sub_addrs[nsub_addrs++].sin_port = htons((uint16_t)atoi(tok));
        }
        else if (!strcmp(a, "--pub-path")) cfg.pub_path = VAL();
        else if (!strcmp(a, "--tokens")) cfg.tokens_file = VAL();
        else if (!strcmp(a, "--key")) cfg.key = VAL();
        else if (!strcmp(a, "--conns")) cfg.conns = atol(VAL());
        else if (!strcmp(a, "--rooms")) cfg.rooms = atol(VAL());
        else if (!strcmp(a, "--topics-per-conn")) cfg.topics_per_conn = atol(VAL());
        else if (!strcmp(a, "--inflight-connects")) cfg.inflight_connects = atol(VAL());
        else if (!strcmp(a, "--connect-timeout")) cfg.connect_timeout = atof(VAL());
        else if (!strcmp(a, "--heartbeat")) cfg.heartbeat = atof(VAL());
        else if (!strcmp(a, "--hold")) cfg.hold = 1;
        else if (!strcmp(a, "--messages")) cfg.messages = atol(VAL());
        else if (!strcmp(a, "--seconds")) cfg.seconds = atof(VAL());
        else if (!strcmp(a, "--rate")) cfg.rate = atof(VAL());
        else if (!strcmp(a, "--http-conns")) cfg.http_conns = atol(VAL());
        else if (!strcmp(a, "--max-inflight")) cfg.max_inflight = atol(VAL());
        else if (!strcmp(a, "--batch")) cfg.batch = atol(VAL());
        else if (!strcmp(a, "--room-serial")) cfg.room_serial = 1;
        else if (!strcmp(a, "--frame-bytes")) cfg.frame_bytes = atol(VAL());
        else if (!strcmp(a, "--text-pad")) cfg.text_pad = 1;
        else if (!strcmp(a, "--fields-file")) cfg.fields_file = VAL();
        else if (!strcmp(a, "--deflate")) cfg.deflate = 1;
        else if (!strcmp(a, "--drain-timeout")) cfg.drain_timeout = atof(VAL());
        else if (!strcmp(a, "--latency-samples")) cfg.latency_samples = atol(VAL());
        else die("unknown option %s (see --help)", a);
    }
    if (cfg.port <= 0 || cfg.port > 65535) die("--port is required");
    if (cfg.rooms < 1 || cfg.http_conns < 1 || cfg.max_inflight < 0 || cfg.conns < 0) die("bad counts");
    if (cfg.batch > 0 && cfg.target != T_PUSH) die("--batch is push only");
    if (cfg.topics_per_conn < 1 || cfg.topics_per_conn > 1000) die("--topics-per-conn must be 1..1000");
    if (cfg.topics_per_conn > 1 && cfg.target != T_PUSH) die("--topics-per-conn is push only");
    if (cfg.topics_per_conn > cfg.rooms) die("--topics-per-conn must not exceed --rooms (a room would be joined twice)");
    if (cfg.batch > 10000) die("--batch too large (max 10000)");
    if (!cfg.messages && cfg.seconds <= 0) cfg.seconds = 5;
    if (cfg.heartbeat < 0) cfg.heartbeat = cfg.target == T_PUSH ? 30 : 0;
    if (!cfg.sub_path) cfg.sub_path = cfg.target == T_PUSH ? "/socket/websocket?vsn=2.0.0&token={token}" : "/sub/r{room}";
    if (!cfg.pub_path) cfg.pub_path = cfg.target != T_PUSH ? "/pub/r{room}" : cfg.batch ? "/api/batch" : "/api/broadcast";

    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET; addr.sin_port = htons((uint16_t)cfg.port);
    if (inet_pton(AF_INET, cfg.host, &addr.sin_addr) != 1) die("--host must be an IPv4 address");
    if ((ntohl(addr.sin_addr.s_addr) >> 24) != 127) die("refusing a non-loopback host %s", cfg.host);
    for (int k = 0; k < nsub_addrs; k++) {
        uint16_t port = sub_addrs[k].sin_port;
        sub_addrs[k] = addr; sub_addrs[k].sin_port = port;
    }

    if (cfg.tokens_file) {
        FILE *f = fopen(cfg.tokens_file, "r");
        if (!f) die("%s: %s", cfg.tokens_file, strerror(errno));
        char *line = NULL; size_t cap = 0; ssize_t n;
        while ((n = getline(&line, &cap, f)) > 0) {
            while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
            if (!n) continue;
            tokens = xrealloc(tokens, (size_t)(ntokens + 1) * sizeof *tokens);
            tokens[ntokens++] = strdup(line);
        }
        free(line); fclose(f);
    }
    if (cfg.target == T_PUSH && cfg.conns && !ntokens) die("push needs --tokens");

    /* Pad so the delivered frame is about --frame-bytes, measured on a representative message. */
    {
        char sample[512];
        pad = ""; int base = payload_json(sample, sizeof sample, 100, 0, now_ns());
        if (cfg.target == T_PUSH) base += (int)strlen("[null,null,\"room:lobby:r0\",\"m\",]");
        pad_len = cfg.frame_bytes - base; if (pad_len < 0) pad_len = 0;
        if (pad_len > 3000) pad_len = 3000;
        pad = malloc((size_t)pad_len + 1); memset(pad, 'x', (size_t)pad_len); pad[pad_len] = 0;
        if (cfg.text_pad) {
            /* Words drawn at random from a small vocabulary: about as compressible as chat text (x's are not). */
            static const char *words[] = {"the", "meeting", "is", "moved", "to", "thursday", "because", "half",
                "of", "team", "will", "be", "travelling", "please", "update", "your", "calendar", "and", "let",
                "me", "know", "if", "that", "works", "we", "can", "also", "review", "draft", "release", "notes",
                "deploy", "staging", "after", "lunch", "thanks", "everyone", "for", "quick", "feedback", "on",
                "design", "doc", "I", "think", "should", "ship", "it", "next", "week", "ok", "sounds", "good",
                "what", "about", "tests", "they", "pass", "now", "great", "news", "coffee", "anyone", "later"};
            uint64_t x = cfg.seed;
            long at = 0;
            while (at < pad_len) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                const char *w = words[x % (sizeof words / sizeof *words)];
                for (const char *c = w; *c && at < pad_len; c++) pad[at++] = *c;
                if (at < pad_len) pad[at++] = ' ';
            }
        }
    }

    if (cfg.fields_file) {
        FILE *f = fopen(cfg.fields_file, "rb");
        if (!f) die("cannot open --fields-file");
        fields = calloc(3002, 1);
        size_t n = fread(fields, 1, 3001, f);
        fclose(f);
        if (n == 0 || n > 3000) die("--fields-file must hold 1 to 3000 bytes");
        while (n && (fields[n - 1] == '\n' || fields[n - 1] == '\r')) fields[--n] = 0;
    }

    signal(SIGPIPE, SIG_IGN);
    rng = cfg.seed;
    rbuf = malloc(RBUF_SIZE);
    subs = calloc((size_t)(cfg.conns ? cfg.conns : 1), sizeof(Sub));
    rooms = calloc((size_t)cfg.rooms, sizeof(Room));
    https = calloc((size_t)cfg.http_conns, sizeof(Http));
    st.lat = malloc((size_t)cfg.latency_samples * sizeof(float) + 4);
    if (!rbuf || !subs || !rooms || !https || !st.lat) die("out of memory");
    long J = cfg.topics_per_conn;
    if (J > 1 && cfg.conns) {
        xslots = calloc((size_t)cfg.conns * (size_t)(J - 1), sizeof(Slot));
        if (!xslots) die("out of memory");
    }
    uint32_t *seqs = calloc((size_t)(cfg.conns ? cfg.conns : 1) * (size_t)J * (size_t)cfg.http_conns, sizeof(uint32_t));
    if (!seqs) die("out of memory");
    for (long i = 0; i < cfg.conns; i++) {
        subs[i].fd = -1;
        for (long j = 0; j < J; j++) {
            Slot *sl = sub_slot(i, j);
            sl->room = (uint32_t)(((uint64_t)i * (uint64_t)J + (uint64_t)j) % (uint64_t)cfg.rooms);
            sl->last_seq = seqs + ((size_t)i * (size_t)J + (size_t)j) * (size_t)cfg.http_conns;
        }
    }
    connect_req_cap = 8192 + (size_t)J * 160;
    connect_req = malloc(connect_req_cap);
    if (!connect_req) die("out of memory");
    ep = epoll_create1(EPOLL_CLOEXEC);
    ep_set(EPOLL_CTL_ADD, 0, EPOLLIN, EV_STDIN, 0);
    if (cfg.max_inflight == 0) {
        pep = epoll_create1(EPOLL_CLOEXEC);
        ep_set(EPOLL_CTL_ADD, pep, EPOLLIN, EV_PUBLISHERS, 0);
    }

    double cpu0 = cpu_s(), next_hb = 0;
    st.t_connect_start = st.t_last_event = now_s();
    struct epoll_event evs[1024];
    while (phase != P_QUIT) {
        double now = now_s();
        int timeout = 20;
        if (phase == P_PUBLISH && st.publishing && cfg.rate > 0) {
            double wait = st.next_due - now;
            timeout = wait <= 0 ? 0 : (int)(wait * 1000) + 1 < 20 ? (int)(wait * 1000) + 1 : 20;
        }
        int n = epoll_wait(ep, evs, 1024, timeout);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        /* Publisher events first, then publish again at once: the server should never sit idle
           while we work through a batch of subscriber reads. */
        for (int e = 0; e < n; e++) {
            int type = (int)(evs[e].data.u64 >> 32);
            uint32_t idx = (uint32_t)evs[e].data.u64;
            if (type == EV_STDIN) on_stdin();
            else if (type == EV_PUBLISHERS) serve_publishers();
            else if (type == EV_HTTP) {
                if (evs[e].events & EPOLLOUT) http_flush(idx);
                if (evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) http_on_readable(idx);
            }
        }
        if (phase == P_PUBLISH) try_publish(now_s());
        for (int e = 0; e < n; e++) {
            int type = (int)(evs[e].data.u64 >> 32);
            uint32_t idx = (uint32_t)evs[e].data.u64;
            if (type != EV_SUB) continue;
            if (pep >= 0 && e % 32 == 31) serve_publishers();
            Sub *s = &subs[idx];
            if (s->state == S_CONNECTING) sub_on_connected(idx);
            else if (s->state != S_DEAD && s->fd >= 0) sub_on_readable(idx);
        }
        now = now_s();
        if (phase == P_CONNECT) {
            while (st.next_connect < cfg.conns && st.pending_connects < cfg.inflight_connects)
                start_connect(st.next_connect++);
            int done = st.next_connect >= cfg.conns && st.pending_connects <= 0;
            if (!done && now - st.t_connect_start > cfg.connect_timeout) {
                fprintf(stderr, "loadgen: connect phase timed out with %ld pending\n", st.pending_connects);
                st.failed += st.pending_connects; done = 1;
            }
            if (done) {
                double secs = st.t_last_event - st.t_connect_start;
                if (secs <= 0) secs = 1e-9;
                printf("{\"phase\":\"connected\",\"conns\":%ld,\"requested\":%ld,\"failed\":%ld,\"connect_errors\":%ld,"
                       "\"seconds\":%.4f,\"connects_per_s\":%.1f,\"cpu_s\":%.4f,\"cpu_pct\":%.1f,\"pad_bytes\":%ld}\n",
                       st.joined, cfg.conns, st.failed, st.connect_errors, secs, st.joined / secs, cpu_s() - cpu0,
                       100.0 * (cpu_s() - cpu0) / secs, pad_len);
                fflush(stdout);
                phase = P_WAIT;
            }
        } else if (phase == P_PUBLISH) {
            try_publish(now);
            check_publish_end(now);
        }
        if (cfg.heartbeat > 0 && now >= next_hb) { heartbeat_sweep(now); next_hb = now + 1; }
    }
    return 0;
}
