# A guest that dirties pages for epoch tests and the epoch benchmark. The host drives it
# through a control block of quadwords at CTRL (0x700000):
#   +0   quota: pages per batch; 0 writes records continuously
#   +8   batch requested (the host increments it)
#   +16  batch done (the guest sets it to the requested one when the batch is written)
#   +24  progress: records written so far
#   +32  page mask: the buffer's pages - 1 (a power of two minus one)
# The buffer starts at BUF (16 MiB). Each write is a 64-byte record at a random 64-byte slot of
# a page: an 8-byte random key (a 64-bit LCG) and 56 bytes of a fixed ASCII template, like the
# entries of a key-value store; pages start zero and fill up with records. A batch writes
# `quota` distinct random pages (start and odd stride drawn from the LCG, modulo the buffer).
    .code64
    .globl _start
    .set CTRL, 0x700000
    .set BUF, 0x1000000
_start:
    mov     $CTRL, %rbp
    movabs  $0x9e3779b97f4a7c15, %r13   # LCG state
    movabs  $6364136223846793005, %r14
    movabs  $1442695040888963407, %r15
loop:
    mov     (%rbp), %rcx                # quota
    test    %rcx, %rcx
    jz      continuous
    mov     8(%rbp), %rax
    cmp     16(%rbp), %rax
    je      idle
    # A batch of rcx distinct pages: page_i = (start + i * stride) & mask.
    mov     %rax, %r12                  # the batch being written
    call    lcg
    mov     %r13, %r8
    shr     $17, %r8                    # start
    call    lcg
    mov     %r13, %r9
    shr     $23, %r9
    or      $1, %r9                     # odd stride
1:  mov     %r8, %rax
    call    record
    add     %r9, %r8
    incq    24(%rbp)
    dec     %rcx
    jnz     1b
    mov     %r12, 16(%rbp)
    jmp     loop
idle:
    pause
    jmp     loop
continuous:
    call    lcg
    mov     %r13, %rax
    shr     $19, %rax
    call    record
    incq    24(%rbp)
    jmp     loop

# lcg: steps the LCG in r13.
lcg:
    imul    %r14, %r13
    add     %r15, %r13
    ret

# record: writes a record into page (rax & mask) of the buffer, at a slot from the LCG.
record:
    and     32(%rbp), %rax
    shl     $12, %rax
    add     $BUF, %rax
    call    lcg
    mov     %r13, %rdx
    shr     $50, %rdx                   # slot: 0..63
    shl     $6, %rdx
    add     %rdx, %rax
    mov     %r13, (%rax)                # the key
    mov     template+0(%rip), %rdx
    mov     %rdx, 8(%rax)
    mov     template+8(%rip), %rdx
    mov     %rdx, 16(%rax)
    mov     template+16(%rip), %rdx
    mov     %rdx, 24(%rax)
    mov     template+24(%rip), %rdx
    mov     %rdx, 32(%rax)
    mov     template+32(%rip), %rdx
    mov     %rdx, 40(%rax)
    mov     template+40(%rip), %rdx
    mov     %rdx, 48(%rax)
    mov     template+48(%rip), %rdx
    mov     %rdx, 56(%rax)
    ret

template:
    .ascii  " user:session=active; ttl=3600; region=eu-west; v=1;\n"
    .ascii  "\0\0\0"
