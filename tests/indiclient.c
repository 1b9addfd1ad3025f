/* A small INDI client for tests/benchmark.py, built there with the C compiler: it adds little to what it measures.
   round trips:  indiclient rtt PORT ASK SETUP DEVICE VECTOR MEMBER VALUE0 VALUE1 EXPECT0 EXPECT1 WARMUP COUNT
                 prints one round trip in nanoseconds per line
   fan-out:      indiclient fan PORT ASK SETUP DEVICE VECTOR CLIENTS WARMUP_S SECONDS
                 prints "counting", then "done", then per client: updates, steps other than 0.2
   wake-ups:     indiclient tick RATE SECONDS
                 only wakes RATE times a second on a fixed schedule, for SECONDS: the least a
                 process polling at RATE costs on this machine
   SETUP, if not empty, is sent once the device has defined CONNECTION (ASK must ask for it). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <math.h>

#define SIZE (1 << 20)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
    for (int tries = 0; connect(fd, (struct sockaddr *)&address, sizeof address) < 0; tries++) {
        if (tries > 500) { perror("connect"); exit(2); }
        close(fd);
        fd = socket(AF_INET, SOCK_STREAM, 0);
        usleep(10000);
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void say(int fd, const char *text) {
    size_t length = strlen(text);
    if (length && send(fd, text, length, 0) != (ssize_t)length) { perror("send"); exit(2); }
}

typedef struct { int fd; char *buf; size_t len, pos; } Conn;

static void fill(Conn *c) {
    if (c->len > SIZE / 2) {            /* keep what is not yet scanned */
        memmove(c->buf, c->buf + c->pos, c->len - c->pos);
        c->len -= c->pos; c->pos = 0;
    }
    ssize_t n = recv(c->fd, c->buf + c->len, SIZE - 1 - c->len, 0);
    if (n <= 0) { fprintf(stderr, "connection closed\n"); exit(2); }
    c->len += n;
    c->buf[c->len] = 0;
    int one = 1;    /* indiserver does not set TCP_NODELAY: acknowledge at once, or Nagle holds its next answer */
    setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
}

/* True if some element between start and end has exactly this text, give or take white space. */
static int has_text(const char *start, const char *end, const char *text) {
    size_t length = strlen(text);
    for (const char *p = strchr(start, '>'); p && p < end; p = strchr(p + 1, '>')) {
        const char *q = p + 1;
        while (*q == ' ' || *q == '\n' || *q == '\t' || *q == '\r') q++;
        if (strncmp(q, text, length)) continue;
        q += length;
        while (*q == ' ' || *q == '\n' || *q == '\t' || *q == '\r') q++;
        if (*q == '<') return 1;
    }
    return 0;
}

/* Read until an element <TAG ...>...</TAG> containing needle (and text, if given) arrives; consume through it. */
static void wait_for(Conn *c, const char *tag, const char *needle, const char *text) {
    char open[64], close_[64];
    snprintf(open, sizeof open, "<%s", tag);
    snprintf(close_, sizeof close_, "</%s>", tag);
    for (;;) {
        char *start = strstr(c->buf + c->pos, open);
        if (!start) { c->pos = c->len > 64 ? c->len - 64 : 0; fill(c); continue; }
        char *end = strstr(start, close_);
        if (!end) { c->pos = start - c->buf; fill(c); continue; }
        end += strlen(close_);
        char saved = *end; *end = 0;
        int found = strstr(start, needle) && (!text || has_text(start, end, text));
        *end = saved;
        c->pos = end - c->buf;
        if (found) return;
    }
}

static void setup(Conn *c, const char *ask, const char *setup_text, const char *device, const char *vector) {
    char name[256];
    say(c->fd, ask);
    if (*setup_text) {                   /* the weather simulator: connect, then its definitions follow */
        snprintf(name, sizeof name, "name=\"%s\"", "CONNECTION");
        wait_for(c, "defSwitchVector", name, NULL);
        say(c->fd, setup_text);
    }
    snprintf(name, sizeof name, "name=\"%s\"", vector);
    wait_for(c, "defNumberVector", name, NULL);
}

static int round_trips(char **argv) {
    int port = atoi(argv[2]);
    const char *device = argv[5], *vector = argv[6], *member = argv[7];
    const char *values[2] = {argv[8], argv[9]}, *expect[2] = {argv[10], argv[11]};
    int warmup = atoi(argv[12]), count = atoi(argv[13]);
    Conn c = {connect_to(port), malloc(SIZE), 0, 0};
    c.buf[0] = 0;
    setup(&c, argv[3], argv[4], device, vector);
    char name[256], request[1024];
    snprintf(name, sizeof name, "name=\"%s\"", vector);
    double *times = malloc(sizeof(double) * (warmup + count));
    for (int i = 0; i < warmup + count; i++) {
        snprintf(request, sizeof request, "<newNumberVector device=\"%s\" name=\"%s\"><oneNumber name=\"%s\">"
                 "%s</oneNumber></newNumberVector>", device, vector, member, values[i % 2]);
        double started = now();
        say(c.fd, request);
        wait_for(&c, "setNumberVector", name, expect[i % 2]);
        times[i] = now() - started;
    }
    for (int i = warmup; i < warmup + count; i++)
        printf("%.0f\n", times[i] * 1e9);
    return 0;
}

static int fan_out(char **argv) {
    int port = atoi(argv[2]), clients = atoi(argv[7]);
    const char *device = argv[5], *vector = argv[6];
    double warmup = atof(argv[8]), seconds = atof(argv[9]);
    char pattern[512];
    snprintf(pattern, sizeof pattern, "<setNumberVector device=\"%s\" name=\"%s\"", device, vector);
    size_t plen = strlen(pattern);
    Conn *conns = calloc(clients, sizeof(Conn));
    struct pollfd *polls = calloc(clients, sizeof(struct pollfd));
    long *counts = calloc(clients, sizeof(long)), *gaps = calloc(clients, sizeof(long));
    double *last = calloc(clients, sizeof(double));
    char ask_vector[512];      /* the first client asks as told and sets up; the others ask for the vector */
    snprintf(ask_vector, sizeof ask_vector, "<getProperties version=\"1.7\" device=\"%s\" name=\"%s\"/>",
             device, vector);
    for (int i = 0; i < clients; i++) {
        conns[i] = (Conn){connect_to(port), malloc(SIZE), 0, 0};
        conns[i].buf[0] = 0;
        setup(&conns[i], i == 0 ? argv[3] : ask_vector, i == 0 ? argv[4] : "", device, vector);
        polls[i] = (struct pollfd){.fd = conns[i].fd, .events = POLLIN};
        last[i] = NAN;
    }
    double started = now(), counting_from = started + warmup, until = counting_from + seconds;
    int counting = 0;
    for (double t = now(); t < until; t = now()) {
        if (!counting && t >= counting_from) { counting = 1; printf("counting\n"); fflush(stdout); }
        if (poll(polls, clients, 100) <= 0) continue;
        for (int i = 0; i < clients; i++) {
            if (!(polls[i].revents & (POLLIN | POLLERR | POLLHUP))) continue;
            Conn *c = &conns[i];
            fill(c);
            for (;;) {                          /* each complete update, its temperature if it has one */
                char *start = strstr(c->buf + c->pos, pattern);
                if (!start) { c->pos = c->len > plen ? c->len - plen : 0; break; }
                char *end = strstr(start, "</setNumberVector>");
                if (!end) { c->pos = start - c->buf; break; }
                c->pos = end - c->buf;
                if (!counting) continue;
                counts[i]++;
                char *value = strstr(start + plen, "name=\"temperature\">");
                if (value && value < end) {
                    double temperature = atof(value + 19);
                    if (!isnan(last[i]) && fabs(fabs(temperature - last[i]) - 0.2) > 0.01) gaps[i]++;
                    last[i] = temperature;
                }
            }
        }
    }
    printf("done\n");
    for (int i = 0; i < clients; i++) printf("%ld %ld\n", counts[i], gaps[i]);
    return 0;
}

static int tick(char **argv) {
    double rate = atof(argv[2]), seconds = atof(argv[3]);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    long step = (long)(1e9 / rate);
    for (long i = 0; i < (long)(rate * seconds); i++) {
        next.tv_nsec += step;
        while (next.tv_nsec >= 1000000000L) { next.tv_nsec -= 1000000000L; next.tv_sec++; }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 14 && !strcmp(argv[1], "rtt")) return round_trips(argv);
    if (argc == 10 && !strcmp(argv[1], "fan")) return fan_out(argv);
    if (argc == 4 && !strcmp(argv[1], "tick")) return tick(argv);
    fprintf(stderr, "usage: see the comment at the top\n");
    return 2;
}
