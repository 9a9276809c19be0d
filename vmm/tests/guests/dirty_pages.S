# Writes one quadword into each of 16 pages at 8 MiB, 8 MiB + 8 KiB, ... (every other page),
# then halts.
    .code64
    .globl _start
_start:
    mov     $0x800000, %rdi
    mov     $16, %rcx
1:  movq    %rcx, (%rdi)
    add     $0x2000, %rdi
    dec     %rcx
    jnz     1b
    hlt
