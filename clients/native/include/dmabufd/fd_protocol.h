/*
 * The dmabufd fd-socket protocol, version 1, for C and C++.
 *
 * protos/fd-protocol.md is the specification; every number below comes
 * from it, and this header is the only place the native client writes
 * them down. Frames are SOCK_SEQPACKET messages of the packed structs
 * here, every integer little-endian. The structs describe the bytes on
 * the wire: copy a received message into one with memcpy (never cast an
 * unaligned receive buffer) and convert integers with le16toh/le32toh/
 * le64toh, so the code stays right on a big-endian machine too.
 *
 * Plain C11 (C++11 and later too): no function, no dependency beyond
 * <stddef.h> and <stdint.h>.
 */
#ifndef DMABUFD_FD_PROTOCOL_H
#define DMABUFD_FD_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#define DBFD_STATIC_ASSERT(condition, message) static_assert(condition, message)
#else
#define DBFD_STATIC_ASSERT(condition, message) _Static_assert(condition, message)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- 1.1 where the daemon listens --------------------------------------- */

#define DBFD_RUNTIME_DIR_ENV "DMABUFD_RUNTIME_DIR"
#define DBFD_SYSTEM_RUNTIME_DIR "/run/dmabufd"
#define DBFD_CONTROL_SOCKET_NAME "dmabufd.sock"  /* SOCK_STREAM, gRPC */
#define DBFD_FD_SOCKET_NAME "dmabufd.fd.sock"    /* SOCK_SEQPACKET, this protocol */
#define DBFD_LOCK_FILE_NAME "dmabufd.lock"       /* clients ignore it */
/* On Android, init makes both sockets in /dev/socket under its names (1.1). */
#define DBFD_ANDROID_SOCKET_DIR "/dev/socket"
#define DBFD_ANDROID_CONTROL_SOCKET_NAME "dmabufd"
#define DBFD_ANDROID_FD_SOCKET_NAME "dmabufd_fd"

/* ---- 3.1 gRPC metadata every BufferService call carries ------------------ */

#define DBFD_SESSION_METADATA_KEY "dmabufd-session" /* token, 64 lower-case hex digits */
#define DBFD_TICKET_METADATA_KEY "dmabufd-ticket"   /* ticket, 32 lower-case hex digits */

/* ---- 2.1 the header ------------------------------------------------------ */

#define DBFD_MAGIC "DBFD"     /* 44 42 46 44, bytes 0..3 of every frame */
#define DBFD_MAGIC_BYTES 4
#define DBFD_VERSION 1

/* 2.2: the frame types, with the direction each travels. */
enum dbfd_frame_type {
    DBFD_FRAME_HELLO = 1,  /* daemon -> client, once, first */
    DBFD_FRAME_TICKET = 2, /* client -> daemon, before each call */
    DBFD_FRAME_FDS = 3,    /* daemon -> client, a call's buffer fds */
    DBFD_FRAME_ERROR = 4,  /* daemon -> client only */
    DBFD_FRAME_FILE = 5    /* client -> daemon, a ticket with one file fd */
};

/* ---- 0. gRPC status codes: in ERROR frames (2.7) and call statuses (3.3) --- */

enum dbfd_status_code {
    DBFD_STATUS_OK = 0,
    DBFD_STATUS_CANCELLED = 1,
    DBFD_STATUS_UNKNOWN = 2,
    DBFD_STATUS_INVALID_ARGUMENT = 3,    /* ERROR: a rejected client frame (section 7) */
    DBFD_STATUS_DEADLINE_EXCEEDED = 4,
    DBFD_STATUS_NOT_FOUND = 5,
    DBFD_STATUS_ALREADY_EXISTS = 6,
    DBFD_STATUS_PERMISSION_DENIED = 7,   /* ERROR instead of HELLO: not admitted (1.3) */
    DBFD_STATUS_RESOURCE_EXHAUSTED = 8,  /* ERROR instead of HELLO: too many sessions (1.3) */
    DBFD_STATUS_FAILED_PRECONDITION = 9,
    DBFD_STATUS_ABORTED = 10,
    DBFD_STATUS_OUT_OF_RANGE = 11,
    DBFD_STATUS_UNIMPLEMENTED = 12,
    DBFD_STATUS_INTERNAL = 13,
    DBFD_STATUS_UNAVAILABLE = 14,
    DBFD_STATUS_DATA_LOSS = 15,
    DBFD_STATUS_UNAUTHENTICATED = 16
};

/* The google.rpc.ErrorInfo domain of every reason the daemon gives. */
#define DBFD_ERROR_DOMAIN "dmabufd.dev"

/* ---- 0. sizes ------------------------------------------------------------ */

#define DBFD_TOKEN_BYTES 32
#define DBFD_TICKET_BYTES 16
#define DBFD_HEADER_BYTES 8
#define DBFD_HELLO_BYTES 60
#define DBFD_TICKET_FRAME_BYTES 24
#define DBFD_FILE_FRAME_BYTES 24
#define DBFD_FDS_HEAD_BYTES 32          /* FDS frame before its buffer ids */
#define DBFD_FDS_ID_BYTES 8             /* one u64 buffer id per fd */
#define DBFD_ERROR_HEAD_BYTES 12        /* ERROR frame before its message */
#define DBFD_ERROR_MESSAGE_MAX 1024     /* UTF-8, not NUL-terminated, may be cut mid-character */
#define DBFD_MAX_FDS_PER_FRAME 253      /* the kernel's SCM_MAX_FD */
#define DBFD_MIN_FDS_FRAME_BYTES (DBFD_FDS_HEAD_BYTES + DBFD_FDS_ID_BYTES)
#define DBFD_MAX_FRAME_BYTES (DBFD_FDS_HEAD_BYTES + DBFD_FDS_ID_BYTES * DBFD_MAX_FDS_PER_FRAME) /* 2056 */
/* One byte more than the largest frame, so a too-long one shows as MSG_TRUNC. */
#define DBFD_RECEIVE_BUFFER_BYTES (DBFD_MAX_FRAME_BYTES + 1)

/* ---- 0. the daemon's fixed limits (3.2, 3.4, 3.6, 7) ---------------------- */

#define DBFD_TICKET_WAIT_MS 2000          /* a call waits this long for its ticket */
#define DBFD_TICKET_TTL_MS 60000          /* an unused ticket expires */
#define DBFD_MAX_OUTSTANDING_TICKETS 256  /* per session, FILE tickets included */
#define DBFD_MAX_DEPOSITED_FILES 16       /* FILE deposits waiting per session */
#define DBFD_MAX_PROTOCOL_ERRORS 64       /* the 64th rejected frame ends the session */

/* ---- 0. the daemon's configurable limits, at their defaults --------------- */

#define DBFD_DEFAULT_OUTBOX_FRAMES 64       /* limits.outbox_frames */
#define DBFD_DEFAULT_OUTBOX_STALL_MS 5000   /* limits.outbox_stall_s */
#define DBFD_DEFAULT_SESSIONS_PER_UID 64    /* limits.sessions_per_uid */
#define DBFD_DEFAULT_CALLS_PER_UID 32       /* limits.calls_per_uid, ticket waits included */
#define DBFD_DEFAULT_WATCHES_PER_UID 1024   /* limits.watches_per_uid */
#define DBFD_DEFAULT_LOADS_PER_UID 2        /* limits.loads_per_uid */
#define DBFD_DEFAULT_GRANT_BUFFERS 256      /* limits.grant_buffers */
#define DBFD_DEFAULT_MAX_BATCH 1024         /* heaps.max_batch: buffers per Allocate / LoadFile */
#define DBFD_MAX_REQUEST_MESSAGE_BYTES (4 * 1024 * 1024) /* largest gRPC request */

/* ---- 2. the frames --------------------------------------------------------- */

#define DBFD_PACKED __attribute__((packed))

/* 2.1: every frame starts with this. */
struct DBFD_PACKED dbfd_header {
    uint8_t magic[DBFD_MAGIC_BYTES]; /* DBFD_MAGIC */
    uint8_t version;                 /* DBFD_VERSION */
    uint8_t type;                    /* enum dbfd_frame_type */
    uint16_t reserved;               /* senders write 0; receivers ignore it */
};

/* 2.3: the daemon's first frame. */
struct DBFD_PACKED dbfd_hello {
    struct dbfd_header header;
    uint64_t session_id;                /* from 1, unique while the daemon runs */
    uint8_t token[DBFD_TOKEN_BYTES];    /* its hex form is the session metadata */
    int32_t pid;                        /* as the daemon saw them (SO_PEERCRED): for diagnosis */
    int32_t uid;
    int32_t gid;
};

/* 2.4 and 2.5: TICKET, and FILE (the same bytes plus one SCM_RIGHTS fd). */
struct DBFD_PACKED dbfd_ticket {
    struct dbfd_header header;
    uint8_t ticket[DBFD_TICKET_BYTES]; /* random (getrandom), never reused */
};

/* 2.6: FDS, followed by n u64 buffer ids, n = (size - 32) / 8, 1..253;
 * the frame's SCM_RIGHTS array holds fd k for buffer_id[k]. */
struct DBFD_PACKED dbfd_fds_head {
    struct dbfd_header header;
    uint8_t ticket[DBFD_TICKET_BYTES]; /* the call these buffers are for */
    uint32_t first_index;              /* this frame's first buffer in the call's list */
    uint32_t total;                    /* buffers of the call, over all its frames */
};

/* 2.7: ERROR, followed by m <= 1024 bytes of message. Names no ticket. */
struct DBFD_PACKED dbfd_error_head {
    struct dbfd_header header;
    uint32_t code; /* a gRPC status code */
};

DBFD_STATIC_ASSERT(sizeof(struct dbfd_header) == DBFD_HEADER_BYTES, "header is 8 bytes");
DBFD_STATIC_ASSERT(sizeof(struct dbfd_hello) == DBFD_HELLO_BYTES, "HELLO is 60 bytes");
DBFD_STATIC_ASSERT(sizeof(struct dbfd_ticket) == DBFD_TICKET_FRAME_BYTES, "TICKET is 24 bytes");
DBFD_STATIC_ASSERT(sizeof(struct dbfd_ticket) == DBFD_FILE_FRAME_BYTES, "FILE is 24 bytes");
DBFD_STATIC_ASSERT(sizeof(struct dbfd_fds_head) == DBFD_FDS_HEAD_BYTES, "FDS head is 32 bytes");
DBFD_STATIC_ASSERT(sizeof(struct dbfd_error_head) == DBFD_ERROR_HEAD_BYTES, "ERROR head is 12 bytes");
DBFD_STATIC_ASSERT(offsetof(struct dbfd_hello, token) == 16, "HELLO token at 16");
DBFD_STATIC_ASSERT(offsetof(struct dbfd_hello, pid) == 48, "HELLO pid at 48");
DBFD_STATIC_ASSERT(offsetof(struct dbfd_fds_head, first_index) == 24, "FDS first_index at 24");
DBFD_STATIC_ASSERT(offsetof(struct dbfd_fds_head, total) == 28, "FDS total at 28");
DBFD_STATIC_ASSERT(offsetof(struct dbfd_error_head, code) == 8, "ERROR code at 8");
DBFD_STATIC_ASSERT(DBFD_MAX_FRAME_BYTES == 2056, "largest frame is 2056 bytes");
DBFD_STATIC_ASSERT(DBFD_ERROR_HEAD_BYTES + DBFD_ERROR_MESSAGE_MAX < DBFD_MAX_FRAME_BYTES,
                   "every ERROR frame fits the receive buffer");

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DMABUFD_FD_PROTOCOL_H */
