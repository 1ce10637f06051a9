// A failed gRPC call as a typed dmabufd::Error (errors.hpp).
#pragma once

#include <grpcpp/support/status.h>

#include <string>
#include <vector>

#include "dmabufd/errors.hpp"
#include "dmabufd/session.hpp"

namespace dmabufd::detail {

// The rich error model's ErrorInfo (domain dmabufd.dev) and QuotaFailure
// from a grpc-status-details-bin trailer; empty when the bytes are
// missing, malformed, or carry a code other than `code` (such a trailer
// is not trusted, as grpcio-status does not trust it).
ErrorDetails decode_rich_details(const std::string& status_details_bin, StatusCode code);

// `rejected_meanwhile`: ERROR frames the session got while the call was
// in flight (they name no call; reported, never the cause of a failure).
[[noreturn]] void throw_rpc_error(const grpc::Status& status, const std::vector<ErrorFrame>& rejected_meanwhile = {});

}  // namespace dmabufd::detail
