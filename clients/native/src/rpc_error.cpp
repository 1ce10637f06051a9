#include "rpc_error.hpp"

#include "rich_status.pb.h"

namespace dmabufd::detail {

namespace {

// "type.googleapis.com/google.rpc.ErrorInfo" names google.rpc.ErrorInfo.
bool names_type(const google::protobuf::Any& any, const std::string& full_name) {
    const std::string& url = any.type_url();
    const std::size_t slash = url.rfind('/');
    return url.compare(slash == std::string::npos ? 0 : slash + 1, std::string::npos, full_name) == 0;
}

}  // namespace

ErrorDetails decode_rich_details(const std::string& status_details_bin, StatusCode code) {
    ErrorDetails details;
    native::rpc::Status status;
    if (status_details_bin.empty() || !status.ParseFromString(status_details_bin) ||
        status.code() != static_cast<int>(code)) {
        return details;
    }
    for (const google::protobuf::Any& detail : status.details()) {
        if (names_type(detail, "google.rpc.ErrorInfo")) {
            native::rpc::ErrorInfo info;
            // The first ErrorInfo of our domain wins; others are ignored.
            if (info.ParseFromString(detail.value()) && info.domain() == DBFD_ERROR_DOMAIN && details.reason.empty()) {
                details.reason = info.reason();
                details.metadata.insert(info.metadata().begin(), info.metadata().end());
            }
        } else if (names_type(detail, "google.rpc.QuotaFailure")) {
            native::rpc::QuotaFailure failure;
            if (failure.ParseFromString(detail.value())) {
                for (const auto& violation : failure.violations()) {
                    details.quota_violations.push_back({violation.subject(), violation.description()});
                }
            }
        }
    }
    return details;
}

void throw_rpc_error(const grpc::Status& status, const std::vector<ErrorFrame>& rejected_meanwhile) {
    const auto code = static_cast<StatusCode>(status.error_code());
    std::string message = status.error_message();
    if (message.empty()) {
        message = status_name(code);
    }
    ErrorDetails details = decode_rich_details(status.error_details(), code);
    for (const ErrorFrame& frame : rejected_meanwhile) {
        details.rejected_frames.push_back(std::to_string(frame.code) + ": " + frame.message);
    }
    if (!details.rejected_frames.empty()) {
        message += " (meanwhile dmabufd rejected frames of this session: " + details.rejected_frames.front();
        message += details.rejected_frames.size() > 1 ? ", ...)" : ")";
    }
    throw_status_error(code, message, std::move(details));
}

}  // namespace dmabufd::detail
