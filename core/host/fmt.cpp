// fmt's compiled part, for the copy of fmt that LibTorch ships, which has
// only the headers (meson.build says why it is compiled here rather than
// used header-only). format-inl.h defines the functions that fmt's headers
// declare; the templates below are those the headers use for these types
// without their definitions, which are in format-inl.h too. In the main
// build it is linked into every library and program, hidden in each.
#include <fmt/format-inl.h>

FMT_BEGIN_NAMESPACE
namespace detail {

template auto thousands_sep_impl<char>(locale_ref) -> thousands_sep_result<char>;
template auto thousands_sep_impl<wchar_t>(locale_ref) -> thousands_sep_result<wchar_t>;
template auto decimal_point_impl<char>(locale_ref) -> char;
template auto decimal_point_impl<wchar_t>(locale_ref) -> wchar_t;
template auto dragonbox::to_decimal<float>(float) noexcept -> dragonbox::decimal_fp<float>;
template auto dragonbox::to_decimal<double>(double) noexcept -> dragonbox::decimal_fp<double>;

}  // namespace detail
FMT_END_NAMESPACE
