# A deterministic computation: N steps of a 64-bit LCG, N read from 0x700000 (set by the test).
# The state is kept in rax and stored at 0x600000 after every step; the steps left are in rcx.
# Halts when done.
    .code64
    .globl _start
_start:
    mov     $0x12345678, %rax
    mov     0x700000, %rcx
    movabs  $6364136223846793005, %rbx
    movabs  $1442695040888963407, %rsi
    mov     $0x600000, %rdi
1:  imul    %rbx, %rax
    add     %rsi, %rax
    mov     %rax, (%rdi)
    dec     %rcx
    jnz     1b
    hlt
