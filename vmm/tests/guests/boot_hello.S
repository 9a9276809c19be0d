# A tiny "kernel" for `vmr run`: prints a line on COM1, then resets the machine through the
# i8042 like a Linux guest with reboot=k, which ends the VM cleanly.
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
2:  in      $0x64, %al
    test    $0x02, %al
    jnz     2b
    mov     $0xfe, %al
    out     %al, $0x64
3:  jmp     3b
msg:
    .asciz  "hello from vmr run\n"
