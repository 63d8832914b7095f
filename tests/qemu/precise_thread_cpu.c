// A preload library for the QEMU tools the tests run (never for our own binaries): it answers
// getrusage(RUSAGE_THREAD) with the kernel's exact per-thread CPU clock.
//
// Why: QEMU 7.2 picks a LUKS key slot's PBKDF2 iteration count by timing 2^15 iterations with
// the calling thread's user time from getrusage(RUSAGE_THREAD), and gives up ("Unable to get
// accurate CPU usage") when that time did not move. Where the kernel accounts user and system
// time by scheduler ticks, a 6 ms probe often sees no tick: on this development machine 22 of 30
// `qemu-img create -o encrypt.format=luks` failed so, and no number of retries makes a test
// certain. CLOCK_THREAD_CPUTIME_ID is the same thread's CPU time, kept exactly, so the probe
// measures what it means to measure; the image format is untouched (only the iteration count,
// which QEMU derives from the timing anyway, depends on it).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>
#include <time.h>

typedef int (*getrusage_fn)(int, struct rusage*);

int getrusage(int who, struct rusage* usage) {
  static getrusage_fn real_getrusage;
  if (real_getrusage == NULL) real_getrusage = (getrusage_fn)dlsym(RTLD_NEXT, "getrusage");
  if (real_getrusage == NULL) return -1;
  int rc = real_getrusage(who, usage);
  struct timespec cpu;
  if (rc == 0 && who == RUSAGE_THREAD && clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu) == 0) {
    // All of the thread's CPU time is reported as user time: QEMU reads ru_utime only.
    usage->ru_utime.tv_sec = cpu.tv_sec;
    usage->ru_utime.tv_usec = cpu.tv_nsec / 1000;
    usage->ru_stime.tv_sec = 0;
    usage->ru_stime.tv_usec = 0;
  }
  return rc;
}
