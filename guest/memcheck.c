/*
 * memcheck: a guest-side memory checker for live-migration tests.
 *
 * It owns one buffer of N MiB and rewrites it generation after generation.
 * Generation g stores f(g, i) in 64-bit word i. Before a word is overwritten
 * with generation g+1, its current value is compared with f(g, i). So every
 * pass reads back, word by word, what the previous pass wrote -- including
 * words written on the migration source and read on the target after
 * switchover. A stale, zero-filled or otherwise wrong page shows up as
 * mismatches.
 *
 * Console protocol (one line each, written with a single write(2)):
 *   memcheck start mib=N gens=G
 *   memcheck bad word at offset X: got Y want Z gpa=P
 *                            (at most a few per gen; X is the byte offset in
 *                            the buffer, P the guest-physical address of the
 *                            word, from /proc/self/pagemap, or "?" if unknown)
 *   memcheck gen=N bad=B                            (after each full pass)
 *   memcheck done gens=G bad_total=B                (only if gens limit)
 *
 * The "gen=N" line means: generation N-1 was verified over the whole buffer
 * (B mismatching words) and generation N now fills it. Generation 0 is the
 * initial fill and is not reported.
 *
 * Settings come from the kernel command line (/proc/cmdline):
 *   memcheck.mib=N       buffer size in MiB (default 48)
 *   memcheck.gens=G      stop after G checked generations (default 0: never)
 *   memcheck.sleep_ms=S  pause between generations (default 0)
 * When the gens limit is reached and we are PID 1, the guest powers off.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MIB 48
#define MAX_REPORTS_PER_GEN 8

static int out_fd = 1;

/* Print one whole line with a single write so lines never interleave. */
static void say(const char *fmt, ...)
{
	char line[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	for (int off = 0; off < n;) {
		ssize_t w = write(out_fd, line + off, n - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		off += w;
	}
}

/*
 * The pattern. splitmix64's finalizer is a bijection on 64-bit values, and
 * its input (g << 32) ^ i is distinct for every (generation, word) pair as
 * long as i < 2^32 words (32 GiB) and g < 2^32. So no two words of one
 * generation, and no word in two generations, share a value by design.
 */
static inline uint64_t pattern(uint64_t gen, uint64_t word)
{
	uint64_t z = (gen << 32) ^ word;

	z += 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* Value of "key=" in /proc/cmdline, or def if absent or unparsable. */
static unsigned long cmdline_ulong(const char *cmdline, const char *key,
				   unsigned long def)
{
	size_t klen = strlen(key);
	const char *p = cmdline;

	while ((p = strstr(p, key)) != NULL) {
		int at_word_start = (p == cmdline || p[-1] == ' ');

		if (at_word_start && p[klen] == '=') {
			char *end;
			unsigned long v;

			errno = 0;
			v = strtoul(p + klen + 1, &end, 0);
			if (errno == 0 && end != p + klen + 1)
				return v;
			return def;
		}
		p += klen;
	}
	return def;
}

static void read_cmdline(char *buf, size_t size)
{
	int fd = open("/proc/cmdline", O_RDONLY);
	ssize_t n = 0;

	buf[0] = '\0';
	if (fd < 0)
		return;
	n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		n = 0;
	buf[n] = '\0';
	for (ssize_t i = 0; i < n; i++)
		if (buf[i] == '\n' || buf[i] == '\t')
			buf[i] = ' ';
}

/*
 * Guest-physical address of a virtual address, via /proc/self/pagemap (we run
 * as root, so PFNs are visible). With pc/q35 and <3 GiB of RAM this is also
 * the offset of the word in the host's guest-RAM file. Returns 0 if unknown.
 */
static uint64_t guest_phys(const volatile void *addr)
{
	static int fd = -2;
	long page = sysconf(_SC_PAGESIZE);
	uint64_t va = (uintptr_t)addr, entry;

	if (fd == -2)
		fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0 || page <= 0)
		return 0;
	if (pread(fd, &entry, sizeof(entry), (off_t)(va / page * 8)) != sizeof(entry))
		return 0;
	if (!(entry >> 63) || (entry & ((1ULL << 55) - 1)) == 0)
		return 0;
	return (entry & ((1ULL << 55) - 1)) * page + va % page;
}

static void sleep_ms(unsigned long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000,
			       .tv_nsec = (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

int main(void)
{
	char cmdline[4096];
	unsigned long mib, gens, pause_ms;
	/* volatile: every check must really load the word from guest RAM. */
	volatile uint64_t *buf;
	size_t words;
	uint64_t bad_total = 0;

	/* As PID 1 from an initramfs, stdout may not be open: use the console. */
	if (fcntl(1, F_GETFD) < 0) {
		int fd = open("/dev/console", O_WRONLY | O_NOCTTY);

		if (fd >= 0)
			out_fd = fd;
	}

	read_cmdline(cmdline, sizeof(cmdline));
	mib = cmdline_ulong(cmdline, "memcheck.mib", DEFAULT_MIB);
	gens = cmdline_ulong(cmdline, "memcheck.gens", 0);
	pause_ms = cmdline_ulong(cmdline, "memcheck.sleep_ms", 0);
	if (mib == 0)
		mib = DEFAULT_MIB;

	words = (size_t)mib * 1024 * 1024 / sizeof(uint64_t);
	say("memcheck start mib=%lu gens=%lu", mib, gens);

	buf = malloc(words * sizeof(uint64_t));
	if (buf == NULL) {
		say("memcheck error: cannot allocate %lu MiB", mib);
		return 1;
	}

	/* Generation 0: touch and fill every word. */
	for (size_t i = 0; i < words; i++)
		buf[i] = pattern(0, i);

	for (uint64_t g = 1; gens == 0 || g <= gens; g++) {
		uint64_t bad = 0;

		for (size_t i = 0; i < words; i++) {
			uint64_t want = pattern(g - 1, i);
			uint64_t got = buf[i];

			if (got != want) {
				if (bad < MAX_REPORTS_PER_GEN) {
					uint64_t gpa = guest_phys(&buf[i]);
					char where[24] = "?";

					if (gpa)
						snprintf(where, sizeof(where),
							 "0x%" PRIx64, gpa);
					say("memcheck bad word at offset 0x%zx: "
					    "got 0x%016" PRIx64
					    " want 0x%016" PRIx64 " gpa=%s",
					    i * sizeof(uint64_t), got, want,
					    where);
				}
				bad++;
			}
			buf[i] = pattern(g, i);
		}
		bad_total += bad;
		say("memcheck gen=%" PRIu64 " bad=%" PRIu64, g, bad);
		if (pause_ms)
			sleep_ms(pause_ms);
	}

	say("memcheck done gens=%lu bad_total=%" PRIu64, gens, bad_total);
	if (getpid() == 1) {
		sync();
		reboot(RB_POWER_OFF);
	}
	return bad_total ? 1 : 0;
}
