# Counts forever: rax increments, and its value is stored at 0x600000 after every step, so the
# count can be read from both the registers and memory.
    .code64
    .globl _start
_start:
    xor     %rax, %rax
    mov     $0x600000, %rdi
1:  inc     %rax
    mov     %rax, (%rdi)
    jmp     1b
