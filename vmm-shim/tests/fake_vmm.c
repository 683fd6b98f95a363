/*
 * A stand-in for QEMU's guest-memory set-up, for the shim's tests: it maps
 * a memory-backend-file the way QEMU 7.2 does (an anonymous PROT_NONE
 * reservation, then the file MAP_SHARED|MAP_FIXED over it with mmap64), then
 * obeys one command per line on stdin. EOF or "quit": prints "done", exits 0.
 *
 * usage: fake_vmm PATH SIZE ALIGN [use-mmap] [private] [anything else...]
 *   use-mmap: map the file with mmap() instead of mmap64()
 *   private:  map the file MAP_PRIVATE (QEMU's share=off)
 *   other arguments are ignored (they are there for the shim to read in
 *   /proc/self/cmdline, e.g. prealloc=on)
 *
 * commands (each answered with one line on stdout):
 *   write N     fill page N with words (N << 32 | i)    -> "written N"
 *   read N      the first 64-bit word of page N          -> "read N 0x..."
 *   map-again   map the file a second time, MAP_SHARED   -> "mapped-again"
 *   quit                                                 -> "done"
 */
#define _GNU_SOURCE
#define _LARGEFILE64_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s PATH SIZE ALIGN [use-mmap] [private] [...]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    size_t size = strtoull(argv[2], NULL, 0);
    size_t align = strtoull(argv[3], NULL, 0);
    int use_mmap = 0, private = 0;
    for (int i = 4; i < argc; i++) {
        use_mmap |= strcmp(argv[i], "use-mmap") == 0;
        private |= strcmp(argv[i], "private") == 0;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);

    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) die("open");
    if (ftruncate(fd, (off_t)size) < 0) die("ftruncate");

    void *reserved = mmap64(NULL, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (reserved == MAP_FAILED) die("mmap64 (reservation)");
    uintptr_t base = ((uintptr_t)reserved + align - 1) & ~(uintptr_t)(align - 1);
    int flags = (private ? MAP_PRIVATE : MAP_SHARED) | MAP_FIXED;
    int prot = PROT_READ | PROT_WRITE;
    void *ram = use_mmap ? mmap((void *)base, size, prot, flags, fd, 0)
                         : mmap64((void *)base, size, prot, flags, fd, 0);
    if (ram == MAP_FAILED) die("mmap64 (guest memory)");
    printf("mapped %#lx %zu\n", (unsigned long)ram, size);

    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        unsigned long n;
        if (sscanf(line, "write %lu", &n) == 1) {
            uint64_t *page = (uint64_t *)((char *)ram + n * align);
            for (size_t i = 0; i < align / 8; i++) page[i] = ((uint64_t)n << 32) | i;
            printf("written %lu\n", n);
        } else if (sscanf(line, "read %lu", &n) == 1) {
            volatile uint64_t *page = (volatile uint64_t *)((char *)ram + n * align);
            printf("read %lu %#llx\n", n, (unsigned long long)page[0]);
        } else if (strncmp(line, "map-again", 9) == 0) {
            void *again = mmap64(NULL, align, prot, MAP_SHARED, fd, 0);
            if (again == MAP_FAILED) die("mmap64 (again)");
            printf("mapped-again %#lx\n", (unsigned long)again);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        } else {
            printf("error unknown command\n");
        }
    }
    printf("done\n");
    return 0;
}
