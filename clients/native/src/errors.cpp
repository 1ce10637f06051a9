#include "dmabufd/errors.hpp"

#include <cstring>
#include <string>
#include <utility>

namespace dmabufd {

const char* status_name(StatusCode code) {
    switch (code) {
        case StatusCode::Ok: return "OK";
        case StatusCode::Cancelled: return "CANCELLED";
        case StatusCode::Unknown: return "UNKNOWN";
        case StatusCode::InvalidArgument: return "INVALID_ARGUMENT";
        case StatusCode::DeadlineExceeded: return "DEADLINE_EXCEEDED";
        case StatusCode::NotFound: return "NOT_FOUND";
        case StatusCode::AlreadyExists: return "ALREADY_EXISTS";
        case StatusCode::PermissionDenied: return "PERMISSION_DENIED";
        case StatusCode::ResourceExhausted: return "RESOURCE_EXHAUSTED";
        case StatusCode::FailedPrecondition: return "FAILED_PRECONDITION";
        case StatusCode::Aborted: return "ABORTED";
        case StatusCode::OutOfRange: return "OUT_OF_RANGE";
        case StatusCode::Unimplemented: return "UNIMPLEMENTED";
        case StatusCode::Internal: return "INTERNAL";
        case StatusCode::Unavailable: return "UNAVAILABLE";
        case StatusCode::DataLoss: return "DATA_LOSS";
        case StatusCode::Unauthenticated: return "UNAUTHENTICATED";
    }
    return "UNKNOWN";
}

Error::Error(StatusCode status, const std::string& message, ErrorDetails details)
    : std::runtime_error(message), status_(status), details_(std::move(details)) {}

SystemError::SystemError(const std::string& what_failed, int error_number)
    : Error(StatusCode::Unknown, what_failed + ": " + std::strerror(error_number)), errno_(error_number) {}

namespace {

using Thrower = void (*)(StatusCode, const std::string&, ErrorDetails&&);

template <typename Class>
[[noreturn]] void throw_as(StatusCode status, const std::string& message, ErrorDetails&& details) {
    throw Class(status, message, std::move(details));
}

struct ReasonClass {
    const char* reason;
    StatusCode status;  // the status the reason comes with (dmabufd.proto)
    Thrower thrower;
};

// The reasons listed at the top of protos/dmabufd/v1/dmabufd.proto that
// have a class of their own (INVALID_REQUEST, OUT_OF_RANGE and INTERNAL
// are the only reason of their status: the status class is enough).
constexpr ReasonClass kReasonClasses[] = {
    {"HEAP_NOT_FOUND", StatusCode::NotFound, &throw_as<HeapNotFound>},
    {"BUFFER_NOT_FOUND", StatusCode::NotFound, &throw_as<BufferNotFound>},
    {"FILE_NOT_FOUND", StatusCode::NotFound, &throw_as<FileNotFound>},
    {"ACCESS_DENIED", StatusCode::PermissionDenied, &throw_as<AccessDenied>},
    {"QUOTA_EXCEEDED", StatusCode::ResourceExhausted, &throw_as<QuotaExceeded>},
    {"HEAP_OUT_OF_MEMORY", StatusCode::ResourceExhausted, &throw_as<HeapOutOfMemory>},
    {"OVERLOADED", StatusCode::ResourceExhausted, &throw_as<Overloaded>},
    {"BUFFER_BUSY", StatusCode::FailedPrecondition, &throw_as<BufferBusy>},
    {"NOT_ENFORCEABLE", StatusCode::FailedPrecondition, &throw_as<NotEnforceable>},
    {"FILE_CHANGED", StatusCode::FailedPrecondition, &throw_as<FileChanged>},
    {"VERIFY_FAILED", StatusCode::DataLoss, &throw_as<VerifyFailed>},
    {"SESSION_INVALID", StatusCode::Unauthenticated, &throw_as<SessionInvalid>},
    {"HEAP_UNAVAILABLE", StatusCode::Unavailable, &throw_as<HeapUnavailable>},
    {"DELIVERY_FAILED", StatusCode::Unavailable, &throw_as<DeliveryFailed>},
    {"LOAD_CANCELLED", StatusCode::Cancelled, &throw_as<LoadCancelled>},
};

struct StatusClass {
    StatusCode status;
    Thrower thrower;
};

constexpr StatusClass kStatusClasses[] = {
    {StatusCode::InvalidArgument, &throw_as<InvalidArgument>},
    {StatusCode::NotFound, &throw_as<NotFound>},
    {StatusCode::PermissionDenied, &throw_as<PermissionDenied>},
    {StatusCode::ResourceExhausted, &throw_as<ResourceExhausted>},
    {StatusCode::FailedPrecondition, &throw_as<FailedPrecondition>},
    {StatusCode::OutOfRange, &throw_as<OutOfRange>},
    {StatusCode::DataLoss, &throw_as<DataLoss>},
    {StatusCode::Unauthenticated, &throw_as<Unauthenticated>},
    {StatusCode::Unavailable, &throw_as<Unavailable>},
    {StatusCode::DeadlineExceeded, &throw_as<DeadlineExceeded>},
    {StatusCode::Cancelled, &throw_as<Cancelled>},
    {StatusCode::Internal, &throw_as<Internal>},
};

}  // namespace

void throw_status_error(StatusCode status, const std::string& message, ErrorDetails details) {
    // A reason that came with another status (a daemon bug, a newer
    // daemon) does not pick the class: the status does.
    for (const ReasonClass& entry : kReasonClasses) {
        if (entry.status == status && details.reason == entry.reason) {
            entry.thrower(status, message, std::move(details));
        }
    }
    for (const StatusClass& entry : kStatusClasses) {
        if (entry.status == status) {
            entry.thrower(status, message, std::move(details));
        }
    }
    throw Error(status, message, std::move(details));
}

}  // namespace dmabufd
