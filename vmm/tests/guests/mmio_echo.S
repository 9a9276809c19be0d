# Reads a 32-bit value from the MMIO device at 0xd0000000, adds one, writes it back at offset 4,
# writes a 16-bit value at offset 8, then reports the low byte of the sum on port 0x80 and halts.
    .code64
    .globl _start
_start:
    mov     $0xd0000000, %rbx
    movl    (%rbx), %eax
    inc     %eax
    movl    %eax, 4(%rbx)
    movw    $0xbeef, 8(%rbx)
    out     %al, $0x80
    hlt
