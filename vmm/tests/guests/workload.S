# A guest with state worth saving, for snapshot, restore and migration tests through `vmr`:
# ROUNDS rounds; each steps a 64-bit LCG once per page of a 4 MiB buffer at 0x800000 and stores
# the value in that page (at a slot that moves every round), prints "round N" on COM1, then
# waits DELAY TSC cycles (so a round lasts about as long on any host). At the end it prints
# "result=<hex>" - the sum of every quadword of the buffer - and resets the machine through
# the i8042. The result depends on every page and register being carried over exactly.
    .code64
    .globl _start
    .set BUF, 0x800000
    .set PAGES, 1024
    .set ROUNDS, 30
    .set DELAY, 100000000
_start:
    mov     $0x12345678, %r13           # LCG state
    xor     %r12, %r12                  # round
    movabs  $6364136223846793005, %r14
    movabs  $1442695040888963407, %r15
round:
    mov     $BUF, %rdi
    mov     %r12, %rax
    and     $511, %rax
    lea     (%rdi,%rax,8), %rdi         # slot of this round in page 0
    mov     $PAGES, %rcx
1:  imul    %r14, %r13
    add     %r15, %r13
    mov     %r13, (%rdi)
    add     $4096, %rdi
    dec     %rcx
    jnz     1b
    lea     msg_round(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    put_hex
    mov     $'\n', %al
    call    putc
    inc     %r12
    rdtsc
    shl     $32, %rdx
    or      %rax, %rdx
    mov     %rdx, %rbx
    add     $DELAY, %rbx
2:  rdtsc
    shl     $32, %rdx
    or      %rax, %rdx
    cmp     %rbx, %rdx
    jb      2b
    cmp     $ROUNDS, %r12
    jb      round

    # Sum every quadword of the buffer.
    mov     $BUF, %rdi
    mov     $(PAGES * 512), %rcx
    xor     %rbx, %rbx
3:  add     (%rdi), %rbx
    add     $8, %rdi
    dec     %rcx
    jnz     3b
    lea     msg_result(%rip), %rsi
    call    puts
    mov     %rbx, %rax
    call    put_hex
    mov     $'\n', %al
    call    putc
4:  in      $0x64, %al
    test    $0x02, %al
    jnz     4b
    mov     $0xfe, %al
    out     %al, $0x64
5:  jmp     5b

# putc: prints al.
putc:
    push    %rdx
    mov     $0x3f8, %dx
    out     %al, %dx
    pop     %rdx
    ret
# puts: prints the NUL-terminated string at rsi.
puts:
    lodsb
    test    %al, %al
    jz      1f
    call    putc
    jmp     puts
1:  ret
# put_hex: prints rax as 16 hex digits.
put_hex:
    push    %rcx
    push    %rdx
    mov     %rax, %rdx
    mov     $16, %rcx
1:  rol     $4, %rdx
    mov     %dl, %al
    and     $0xf, %al
    add     $'0', %al
    cmp     $'9', %al
    jbe     2f
    add     $('a' - '9' - 1), %al
2:  call    putc
    dec     %rcx
    jnz     1b
    pop     %rdx
    pop     %rcx
    ret
msg_round:
    .asciz  "round "
msg_result:
    .asciz  "result="
