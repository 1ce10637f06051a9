// The dmabufd native client, all of it. See client.hpp to start, errors.hpp
// for the error hierarchy, session.hpp for the threading model.
#pragma once

#include "dmabufd/booking.hpp"
#include "dmabufd/buffer.hpp"
#include "dmabufd/buffer_info.hpp"
#include "dmabufd/client.hpp"
#include "dmabufd/errors.hpp"
#include "dmabufd/fd_protocol.h"
#include "dmabufd/grant.hpp"
#include "dmabufd/mapping.hpp"
#include "dmabufd/pool.hpp"
#include "dmabufd/runtime_dir.hpp"
#include "dmabufd/session.hpp"
#include "dmabufd/ticket.hpp"
#include "dmabufd/unique_fd.hpp"
