#!/usr/bin/env python3
"""Zero a few pages of memcheck's buffer inside a guest-RAM file, from the host.

Self-test for the checker (and a model of the stale/zero-page bug a migration
could cause): run the guest with file-backed RAM (share=on), then

    guest/corrupt-ram.py /dev/shm/guest.ram [PAGES]

finds the 4 KiB pages that hold memcheck data (by inverting memcheck's
pattern function, so no guest cooperation is needed), zeroes PAGES of them
(default 1) through a shared mapping, and prints their file offsets. The guest
must then report exactly PAGES * 512 bad words in total, at gpa = those
offsets (with pc/q35 and < 3 GiB RAM the file offset is the guest-physical
address). Works on shmem and hugetlbfs files (it uses mmap, not write).
"""
import mmap
import os
import struct
import sys

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB


def _unxorshift(z, s):
    x = z
    for _ in range(64 // s + 1):
        x = z ^ (x >> s)
    return x & MASK


def unpattern(word):
    """Inverse of memcheck.c's pattern(): returns (gen << 32) ^ index."""
    z = _unxorshift(word, 31)
    z = (z * pow(M2, -1, 1 << 64)) & MASK
    z = _unxorshift(z, 27)
    z = (z * pow(M1, -1, 1 << 64)) & MASK
    z = _unxorshift(z, 30)
    return (z - GOLDEN) & MASK


def memcheck_pages(mm, size, max_words=1 << 32, max_gen=1 << 31):
    """Yield (file offset, generation, word index) of pages holding memcheck data."""
    for off in range(0, size, 4096):
        w0, w1 = struct.unpack_from("<QQ", mm, off)
        x0, x1 = unpattern(w0), unpattern(w1)
        gen, idx = x0 >> 32, x0 & 0xFFFFFFFF
        if gen < max_gen and idx + 1 < max_words and x1 == ((gen << 32) ^ (idx + 1)):
            yield off, gen, idx


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    path = sys.argv[1]
    want = int(sys.argv[2]) if len(sys.argv) == 3 else 1
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    pages = list(memcheck_pages(mm, size))
    print(f"{len(pages)} pages of {path} hold memcheck data")
    if len(pages) < want:
        sys.exit(f"only {len(pages)} memcheck pages found, wanted {want}")
    # Take them from the middle of the buffer, spread out.
    step = max(1, len(pages) // (want + 1))
    for off, gen, idx in pages[step::step][:want]:
        mm[off:off + 4096] = bytes(4096)
        print(f"zeroed file offset 0x{off:x} (gen {gen}, buffer offset 0x{idx * 8:x})")
    mm.close()
    os.close(fd)


if __name__ == "__main__":
    main()
