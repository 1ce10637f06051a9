// Errors of the dmabufd native client: one hierarchy, all exceptions.
//
// Every failure the library reports is thrown as a dmabufd::Error (a
// std::runtime_error). Its status() is the gRPC status code the daemon
// answered with, or, for failures found on the client side, the code
// that best says what happened. reason() is the daemon's ErrorInfo
// reason (domain "dmabufd.dev", from the google.rpc.Status in the
// grpc-status-details-bin trailer), empty when there was none; a failed
// call also carries the ERROR frames its session got meanwhile
// (rejected_frames()).
//
//   Error
//   ├─ InvalidArgument                         INVALID_ARGUMENT
//   ├─ NotFound                                NOT_FOUND
//   │    HeapNotFound, BufferNotFound, FileNotFound
//   ├─ PermissionDenied ─ AccessDenied         PERMISSION_DENIED
//   ├─ ResourceExhausted                       RESOURCE_EXHAUSTED
//   │    QuotaExceeded, HeapOutOfMemory, Overloaded,
//   │    FdsLost (client side: the kernel dropped a delivery's fds, MSG_CTRUNC)
//   ├─ FailedPrecondition                      FAILED_PRECONDITION
//   │    BufferBusy, NotEnforceable, FileChanged
//   ├─ OutOfRange                              OUT_OF_RANGE
//   ├─ DataLoss ─ VerifyFailed                 DATA_LOSS
//   ├─ Unauthenticated ─ SessionInvalid        UNAUTHENTICATED
//   ├─ Unavailable                             UNAVAILABLE
//   │    HeapUnavailable, DeliveryFailed,
//   │    SessionEnded (client side: the fd socket was closed or reset)
//   ├─ DeadlineExceeded                        DEADLINE_EXCEEDED
//   ├─ Cancelled ─ LoadCancelled               CANCELLED
//   ├─ Internal                                INTERNAL
//   ├─ ProtocolError (client side: the daemon sent bytes this client cannot accept; INTERNAL)
//   └─ SystemError (client side: a system call failed; errno(); UNKNOWN)
//
// Catch a status class to handle every reason under it; catch a reason
// class to tell causes apart (a quota from a heap out of memory from a
// per-uid limit). An unknown reason, or a reason that does not belong to
// the status it came with, is thrown as the status class with reason()
// still set. A status with no class of its own is thrown as Error.
#pragma once

#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "dmabufd/fd_protocol.h"

namespace dmabufd {

// gRPC's status codes (their numbers are fd_protocol.h's).
enum class StatusCode : int {
    Ok = DBFD_STATUS_OK,
    Cancelled = DBFD_STATUS_CANCELLED,
    Unknown = DBFD_STATUS_UNKNOWN,
    InvalidArgument = DBFD_STATUS_INVALID_ARGUMENT,
    DeadlineExceeded = DBFD_STATUS_DEADLINE_EXCEEDED,
    NotFound = DBFD_STATUS_NOT_FOUND,
    AlreadyExists = DBFD_STATUS_ALREADY_EXISTS,
    PermissionDenied = DBFD_STATUS_PERMISSION_DENIED,
    ResourceExhausted = DBFD_STATUS_RESOURCE_EXHAUSTED,
    FailedPrecondition = DBFD_STATUS_FAILED_PRECONDITION,
    Aborted = DBFD_STATUS_ABORTED,
    OutOfRange = DBFD_STATUS_OUT_OF_RANGE,
    Unimplemented = DBFD_STATUS_UNIMPLEMENTED,
    Internal = DBFD_STATUS_INTERNAL,
    Unavailable = DBFD_STATUS_UNAVAILABLE,
    DataLoss = DBFD_STATUS_DATA_LOSS,
    Unauthenticated = DBFD_STATUS_UNAUTHENTICATED,
};

// "NOT_FOUND" for StatusCode::NotFound, as gRPC spells the codes.
const char* status_name(StatusCode code);

struct QuotaViolation {
    std::string subject;  // "uid:<uid>"
    std::string description;
};

// What the rich error model adds to a status; all empty when absent.
struct ErrorDetails {
    std::string reason;                           // ErrorInfo.reason, domain DBFD_ERROR_DOMAIN only
    std::map<std::string, std::string> metadata;  // ErrorInfo.metadata ("uid" for quotas)
    std::vector<QuotaViolation> quota_violations;
    // ERROR frames the fd socket brought while the failed call was in
    // flight, as "CODE: message": the daemon rejected a frame of this
    // session (the call's own ticket, say, past 256 outstanding). Such a
    // frame names no call, so it fails none; a call that fails anyway
    // carries them, since they are likely why.
    std::vector<std::string> rejected_frames;
};

class Error : public std::runtime_error {
public:
    Error(StatusCode status, const std::string& message, ErrorDetails details = {});

    StatusCode status() const noexcept { return status_; }
    const std::string& reason() const noexcept { return details_.reason; }
    const std::map<std::string, std::string>& metadata() const noexcept { return details_.metadata; }
    const std::vector<QuotaViolation>& quota_violations() const noexcept { return details_.quota_violations; }
    const std::vector<std::string>& rejected_frames() const noexcept { return details_.rejected_frames; }

private:
    StatusCode status_;
    ErrorDetails details_;
};

// Status classes.
class InvalidArgument : public Error { public: using Error::Error; };
class NotFound : public Error { public: using Error::Error; };
class PermissionDenied : public Error { public: using Error::Error; };
class ResourceExhausted : public Error { public: using Error::Error; };
class FailedPrecondition : public Error { public: using Error::Error; };
class OutOfRange : public Error { public: using Error::Error; };
class DataLoss : public Error { public: using Error::Error; };
class Unauthenticated : public Error { public: using Error::Error; };
class Unavailable : public Error { public: using Error::Error; };
class DeadlineExceeded : public Error { public: using Error::Error; };
class Cancelled : public Error { public: using Error::Error; };
class Internal : public Error { public: using Error::Error; };

// Reason classes (the daemon's ErrorInfo reasons).
class HeapNotFound : public NotFound { public: using NotFound::NotFound; };
class BufferNotFound : public NotFound { public: using NotFound::NotFound; };
class FileNotFound : public NotFound { public: using NotFound::NotFound; };
class AccessDenied : public PermissionDenied { public: using PermissionDenied::PermissionDenied; };
class QuotaExceeded : public ResourceExhausted { public: using ResourceExhausted::ResourceExhausted; };
class HeapOutOfMemory : public ResourceExhausted { public: using ResourceExhausted::ResourceExhausted; };
class Overloaded : public ResourceExhausted { public: using ResourceExhausted::ResourceExhausted; };
class BufferBusy : public FailedPrecondition { public: using FailedPrecondition::FailedPrecondition; };
class NotEnforceable : public FailedPrecondition { public: using FailedPrecondition::FailedPrecondition; };
class FileChanged : public FailedPrecondition { public: using FailedPrecondition::FailedPrecondition; };
class VerifyFailed : public DataLoss { public: using DataLoss::DataLoss; };
class SessionInvalid : public Unauthenticated { public: using Unauthenticated::Unauthenticated; };
class HeapUnavailable : public Unavailable { public: using Unavailable::Unavailable; };
class DeliveryFailed : public Unavailable { public: using Unavailable::Unavailable; };
class LoadCancelled : public Cancelled { public: using Cancelled::Cancelled; };

// Found on the client side.
class FdsLost : public ResourceExhausted {
public:
    explicit FdsLost(const std::string& message) : ResourceExhausted(StatusCode::ResourceExhausted, message) {}
};
class SessionEnded : public Unavailable {
public:
    explicit SessionEnded(const std::string& message) : Unavailable(StatusCode::Unavailable, message) {}
};
class ProtocolError : public Error {
public:
    explicit ProtocolError(const std::string& message) : Error(StatusCode::Internal, message) {}
};
class SystemError : public Error {
public:
    SystemError(const std::string& what_failed, int error_number);
    int error_number() const noexcept { return errno_; }

private:
    int errno_;
};

// Throws the class for `status` and `details.reason` (see the top of this
// file). Used for gRPC statuses and for ERROR frames (which carry no reason).
[[noreturn]] void throw_status_error(StatusCode status, const std::string& message, ErrorDetails details = {});

}  // namespace dmabufd
