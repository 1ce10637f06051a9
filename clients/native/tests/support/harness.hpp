// A small test harness: each DMABUFD_TEST is one ctest test (CMake finds
// them by reading the sources), run as `dmabufd_conformance --run suite.name`.
#pragma once

#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>

namespace dmabufd_test {

// Not a std::exception, so a test's own `catch (const std::exception&)`
// cannot swallow a failed check.
struct Failure {
    std::string message;
};

[[noreturn]] void fail(const std::string& message, const char* file, int line);

struct Registration {
    Registration(const char* suite, const char* name, void (*body)());
};

template <typename Value>
std::string show(const Value& value) {
    std::ostringstream out;
    if constexpr (std::is_enum_v<Value>) {
        out << static_cast<long long>(value);
    } else {
        out << value;
    }
    return out.str();
}

// Runs `body`, which must throw an `Expected`; returns it. Any other
// exception, or none, fails the test.
template <typename Expected, typename Body>
Expected expect_throw(Body&& body, const char* what, const char* file, int line) {
    try {
        std::forward<Body>(body)();
    } catch (const Expected& error) {
        return error;
    } catch (const std::exception& error) {
        fail(std::string(what) + " threw " + typeid(error).name() + " (" + error.what() + "), not " +
                 typeid(Expected).name(),
             file, line);
    }
    fail(std::string(what) + " threw nothing; expected " + typeid(Expected).name(), file, line);
}

}  // namespace dmabufd_test

#define DMABUFD_TEST(suite, name)                                                                  \
    static void suite##_##name##_body();                                                          \
    static const ::dmabufd_test::Registration suite##_##name##_registration(#suite, #name,        \
                                                                            &suite##_##name##_body); \
    static void suite##_##name##_body()

#define CHECK(condition)                                                            \
    do {                                                                            \
        if (!(condition)) ::dmabufd_test::fail("CHECK(" #condition ")", __FILE__, __LINE__); \
    } while (0)

#define CHECK_MSG(condition, message)                                                                   \
    do {                                                                                                \
        if (!(condition))                                                                               \
            ::dmabufd_test::fail(std::string("CHECK(" #condition "): ") + (message), __FILE__, __LINE__); \
    } while (0)

#define CHECK_EQ(actual, expected)                                                                       \
    do {                                                                                                 \
        const auto& check_actual_ = (actual);                                                            \
        const auto& check_expected_ = (expected);                                                        \
        if (!(check_actual_ == check_expected_))                                                         \
            ::dmabufd_test::fail(std::string(#actual " == " #expected ": ") +                            \
                                     ::dmabufd_test::show(check_actual_) + " != " +                      \
                                     ::dmabufd_test::show(check_expected_),                              \
                                 __FILE__, __LINE__);                                                    \
    } while (0)

#define EXPECT_THROW(Type, expression) \
    ::dmabufd_test::expect_throw<Type>([&] { expression; }, #expression, __FILE__, __LINE__)
