/*
 * fd_protocol.h from C11 (compiled -std=c11 -Wpedantic -Werror): the
 * struct sizes hold as _Static_assert, and a plain C program opens a
 * session with them. Exit 0 when the daemon's HELLO and ERROR frames are
 * what the header says.
 *
 * The protocol is little-endian on the wire; this test runs on
 * little-endian machines, so it reads integers in place after memcpy.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "dmabufd/fd_protocol.h"

_Static_assert(sizeof(struct dbfd_hello) == 60, "HELLO as the spec says");
_Static_assert(DBFD_MAX_FRAME_BYTES == 8 + 24 + 8 * 253, "largest frame as the spec says");

#define FAIL(...)                                     \
    do {                                              \
        fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
        fprintf(stderr, __VA_ARGS__);                 \
        fprintf(stderr, "\n");                        \
        return 1;                                     \
    } while (0)

static ssize_t receive(int sock, unsigned char *data, size_t size, int timeout_ms)
{
    struct pollfd entry = {sock, POLLIN, 0};
    if (poll(&entry, 1, timeout_ms) != 1)
        return -1;
    ssize_t n;
    do
        n = recv(sock, data, size, 0);
    while (n < 0 && errno == EINTR);
    return n;
}

int main(void)
{
    const char *dir = getenv(DBFD_RUNTIME_DIR_ENV);
    if (dir == NULL || *dir == '\0')
        FAIL("%s is not set", DBFD_RUNTIME_DIR_ENV);
    struct sockaddr_un address;
    memset(&address, 0, sizeof address);
    address.sun_family = AF_UNIX;
    if (snprintf(address.sun_path, sizeof address.sun_path, "%s/%s", dir, DBFD_FD_SOCKET_NAME) >=
        (int)sizeof address.sun_path)
        FAIL("runtime dir too long");
    int sock = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&address, sizeof address) < 0)
        FAIL("connect %s: %s", address.sun_path, strerror(errno));

    unsigned char data[DBFD_RECEIVE_BUFFER_BYTES];
    ssize_t n = receive(sock, data, sizeof data, 10000);
    if (n != DBFD_HELLO_BYTES)
        FAIL("HELLO of %zd bytes", n);
    struct dbfd_hello hello;
    memcpy(&hello, data, sizeof hello);
    if (memcmp(hello.header.magic, DBFD_MAGIC, DBFD_MAGIC_BYTES) != 0 || hello.header.version != DBFD_VERSION ||
        hello.header.type != DBFD_FRAME_HELLO)
        FAIL("bad HELLO header");
    if (hello.session_id == 0 || hello.pid != (int32_t)getpid() || hello.uid != (int32_t)getuid())
        FAIL("HELLO session %llu pid %d uid %d", (unsigned long long)hello.session_id, (int)hello.pid,
             (int)hello.uid);

    /* A TICKET frame one byte short: rejected with ERROR, code 3. */
    struct dbfd_ticket ticket;
    memset(&ticket, 0, sizeof ticket);
    memcpy(ticket.header.magic, DBFD_MAGIC, DBFD_MAGIC_BYTES);
    ticket.header.version = DBFD_VERSION;
    ticket.header.type = DBFD_FRAME_TICKET;
    if (send(sock, &ticket, DBFD_TICKET_FRAME_BYTES - 1, MSG_NOSIGNAL) != DBFD_TICKET_FRAME_BYTES - 1)
        FAIL("send: %s", strerror(errno));
    n = receive(sock, data, sizeof data, 10000);
    if (n < DBFD_ERROR_HEAD_BYTES || n > DBFD_ERROR_HEAD_BYTES + DBFD_ERROR_MESSAGE_MAX)
        FAIL("ERROR frame of %zd bytes", n);
    struct dbfd_error_head error;
    memcpy(&error, data, sizeof error);
    if (error.header.type != DBFD_FRAME_ERROR || error.code != DBFD_STATUS_INVALID_ARGUMENT)
        FAIL("frame type %d code %u", error.header.type, (unsigned)error.code);
    printf("HELLO session %llu; ERROR: %.*s\n", (unsigned long long)hello.session_id,
           (int)(n - DBFD_ERROR_HEAD_BYTES), (const char *)data + DBFD_ERROR_HEAD_BYTES);
    close(sock);
    return 0;
}
