/*
 * A workload with the kinds of state a migration must carry: a counter in
 * memory, a file written sequentially (its offset matters), a pipe to a
 * child process, and worker threads. Tests read what it publishes:
 *   DIR/journal   "1\n2\n3\n..." written with write() at the file's offset
 *   DIR/state     "PID COUNT" of the main thread
 *   DIR/child     "CHILD_PID LAST_RECEIVED" from the child reading the pipe
 *   DIR/thread-N  "COUNT" of worker thread N
 *
 * usage: stateful DIR [THREADS]
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *dir;

static void publish(const char *name, const char *text) {
  char path[4096];
  char line[64];
  snprintf(path, sizeof(path), "%s/%s", dir, name);
  int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) exit(1);
  /* Fixed width, so a shorter value never leaves digits of a longer one. */
  memset(line, ' ', sizeof(line));
  memcpy(line, text, strlen(text) < sizeof(line) ? strlen(text) : sizeof(line));
  line[sizeof(line) - 1] = '\n';
  if (pwrite(fd, line, sizeof(line), 0) < 0) exit(1);
  close(fd);
}

static void tick(long ms) {
  struct timespec pause = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
  nanosleep(&pause, NULL);
}

static void *worker(void *arg) {
  long id = (long)arg;
  char name[32], text[32];
  unsigned long long count = 0;
  snprintf(name, sizeof(name), "thread-%ld", id);
  for (;;) {
    count++;
    snprintf(text, sizeof(text), "%llu", count);
    publish(name, text);
    tick(20);
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s DIR [THREADS]\n", argv[0]);
    return 2;
  }
  dir = argv[1];
  long threads = argc > 2 ? atol(argv[2]) : 3;
  int pipefd[2];
  if (pipe(pipefd) < 0) return 1;
  pid_t child = fork();
  if (child < 0) return 1;
  if (child == 0) {
    close(pipefd[1]);
    unsigned long long received;
    char text[64];
    while (read(pipefd[0], &received, sizeof(received)) == (ssize_t)sizeof(received)) {
      snprintf(text, sizeof(text), "%d %llu", (int)getpid(), received);
      publish("child", text);
    }
    return 0;
  }
  close(pipefd[0]);
  for (long i = 0; i < threads; i++) {
    pthread_t t;
    if (pthread_create(&t, NULL, worker, (void *)i) != 0) return 1;
  }
  char path[4096];
  snprintf(path, sizeof(path), "%s/journal", dir);
  int journal = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (journal < 0) return 1;
  unsigned long long count = 0;
  char text[64];
  for (;;) {
    count++;
    int n = snprintf(text, sizeof(text), "%llu\n", count);
    if (write(journal, text, (size_t)n) != n) return 1;
    if (write(pipefd[1], &count, sizeof(count)) != (ssize_t)sizeof(count)) return 1;
    snprintf(text, sizeof(text), "%d %llu", (int)getpid(), count);
    publish("state", text);
    tick(20);
  }
}
