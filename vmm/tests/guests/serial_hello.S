# Prints a line on COM1 (port 0x3f8), then halts.
    .code64
    .globl _start
_start:
    lea     msg(%rip), %rsi
    mov     $0x3f8, %dx
1:  lodsb
    test    %al, %al
    jz      2f
    out     %al, %dx
    jmp     1b
2:  hlt
msg:
    .asciz  "hello from a tiny guest\n"
