# Resets the machine through the i8042 (command 0xFE on port 0x64), as Linux does with
# reboot=k: first waits for the input buffer to be empty (status bit 1 clear).
    .code64
    .globl _start
_start:
1:  in      $0x64, %al
    test    $0x02, %al
    jnz     1b
    mov     $0xfe, %al
    out     %al, $0x64
2:  jmp     2b
