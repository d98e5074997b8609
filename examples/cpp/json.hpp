// json.hpp: a small, strict JSON reader (RFC 8259) for stitch_infer.
//
// Reads a whole document into a tree of sjson::Value. Strict on purpose, because bundles are
// untrusted input: no comments, no trailing commas, no NaN/Infinity, no control characters in
// strings, no leading zeros, no byte-order mark, nesting at most 256 deep. A duplicate object key
// keeps the last value (as Python's json module does). Integers that fit in int64 are kept exactly
// besides their double value. Errors throw sjson::ParseError with line and column.
#pragma once

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sjson {

class ParseError : public std::runtime_error {
 public:
  ParseError(const std::string& what, size_t line, size_t column)
      : std::runtime_error(what + " at line " + std::to_string(line) + " column " + std::to_string(column)) {}
};

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }
  // A number written without fraction or exponent that fits in int64.
  bool is_integer() const { return type_ == Type::Number && integral_; }

  bool as_bool() const { expect(Type::Bool); return bool_; }
  double as_number() const { expect(Type::Number); return number_; }
  int64_t as_int() const {
    if (!is_integer()) throw std::logic_error("sjson: not an integer");
    return int_;
  }
  const std::string& as_string() const { expect(Type::String); return string_; }
  // Array elements, or object values in key order of first appearance.
  const std::vector<Value>& items() const {
    if (type_ != Type::Array && type_ != Type::Object) throw std::logic_error("sjson: not a container");
    return items_;
  }
  // Object keys, in order of first appearance (parallel to items()).
  const std::vector<std::string>& keys() const { expect(Type::Object); return keys_; }
  size_t size() const { return type_ == Type::Array || type_ == Type::Object ? items_.size() : 0; }
  // The member named key, or nullptr (also for non-objects).
  const Value* find(const std::string& key) const {
    if (type_ != Type::Object) return nullptr;
    auto it = index_.find(key);
    return it == index_.end() ? nullptr : &items_[it->second];
  }

  static const char* type_name(Type t) {
    switch (t) {
      case Type::Null: return "null";
      case Type::Bool: return "a boolean";
      case Type::Number: return "a number";
      case Type::String: return "a string";
      case Type::Array: return "an array";
      case Type::Object: return "an object";
    }
    return "?";
  }

 private:
  friend class Parser;
  void expect(Type t) const {
    if (type_ != t) throw std::logic_error(std::string("sjson: not ") + type_name(t));
  }

  Type type_ = Type::Null;
  bool bool_ = false;
  bool integral_ = false;
  double number_ = 0;
  int64_t int_ = 0;
  std::string string_;
  std::vector<Value> items_;
  std::vector<std::string> keys_;
  std::map<std::string, size_t> index_;
};

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value parse_document() {
    if (s_.size() >= 3 && static_cast<unsigned char>(s_[0]) == 0xEF && static_cast<unsigned char>(s_[1]) == 0xBB &&
        static_cast<unsigned char>(s_[2]) == 0xBF)
      error("unexpected UTF-8 byte-order mark");
    Value v;
    skip_ws();
    parse_value(v, 0);
    skip_ws();
    if (pos_ != s_.size()) error("extra data after the JSON value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 256;

  [[noreturn]] void error(const std::string& what) const {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < pos_ && i < s_.size(); ++i) {
      if (s_[i] == '\n') { ++line; col = 1; } else { ++col; }
    }
    throw ParseError(what, line, col);
  }

  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  bool at_end() const { return pos_ >= s_.size(); }

  void parse_value(Value& v, int depth) {
    if (depth > kMaxDepth) error("nesting deeper than 256 levels");
    if (at_end()) error("unexpected end of input, expected a value");
    char c = s_[pos_];
    if (c == '{') return parse_object(v, depth);
    if (c == '[') return parse_array(v, depth);
    if (c == '"') { v.type_ = Value::Type::String; v.string_ = parse_string(); return; }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number(v);
    if (literal("true")) { v.type_ = Value::Type::Bool; v.bool_ = true; return; }
    if (literal("false")) { v.type_ = Value::Type::Bool; v.bool_ = false; return; }
    if (literal("null")) { v.type_ = Value::Type::Null; return; }
    error("invalid value");
  }

  bool literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }

  void parse_object(Value& v, int depth) {
    v.type_ = Value::Type::Object;
    ++pos_;  // '{'
    skip_ws();
    if (!at_end() && s_[pos_] == '}') { ++pos_; return; }
    for (;;) {
      skip_ws();
      if (at_end() || s_[pos_] != '"') error("expected a string key");
      std::string key = parse_string();
      skip_ws();
      if (at_end() || s_[pos_] != ':') error("expected ':' after an object key");
      ++pos_;
      skip_ws();
      Value item;
      parse_value(item, depth + 1);
      auto it = v.index_.find(key);
      if (it != v.index_.end()) {
        v.items_[it->second] = std::move(item);  // duplicate key: the last one wins
      } else {
        v.index_.emplace(key, v.items_.size());
        v.keys_.push_back(std::move(key));
        v.items_.push_back(std::move(item));
      }
      skip_ws();
      if (at_end()) error("unexpected end of input in an object");
      if (s_[pos_] == ',') { ++pos_; continue; }
      if (s_[pos_] == '}') { ++pos_; return; }
      error("expected ',' or '}' in an object");
    }
  }

  void parse_array(Value& v, int depth) {
    v.type_ = Value::Type::Array;
    ++pos_;  // '['
    skip_ws();
    if (!at_end() && s_[pos_] == ']') { ++pos_; return; }
    for (;;) {
      skip_ws();
      v.items_.emplace_back();
      parse_value(v.items_.back(), depth + 1);
      skip_ws();
      if (at_end()) error("unexpected end of input in an array");
      if (s_[pos_] == ',') { ++pos_; continue; }
      if (s_[pos_] == ']') { ++pos_; return; }
      error("expected ',' or ']' in an array");
    }
  }

  void parse_number(Value& v) {
    size_t start = pos_;
    bool integral = true;
    if (s_[pos_] == '-') ++pos_;
    if (at_end() || !isdigit(s_[pos_])) error("invalid number");
    if (s_[pos_] == '0') {
      ++pos_;
      if (!at_end() && isdigit(s_[pos_])) error("invalid number (leading zero)");
    } else {
      while (!at_end() && isdigit(s_[pos_])) ++pos_;
    }
    if (!at_end() && s_[pos_] == '.') {
      integral = false;
      ++pos_;
      if (at_end() || !isdigit(s_[pos_])) error("invalid number (no digit after '.')");
      while (!at_end() && isdigit(s_[pos_])) ++pos_;
    }
    if (!at_end() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      integral = false;
      ++pos_;
      if (!at_end() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (at_end() || !isdigit(s_[pos_])) error("invalid number (no digit in the exponent)");
      while (!at_end() && isdigit(s_[pos_])) ++pos_;
    }
    const char* first = s_.data() + start;
    const char* last = s_.data() + pos_;
    v.type_ = Value::Type::Number;
    auto r = std::from_chars(first, last, v.number_);
    if (r.ec != std::errc() || r.ptr != last) {
      pos_ = start;
      error("number out of range");
    }
    if (integral) {
      auto ri = std::from_chars(first, last, v.int_);
      v.integral_ = ri.ec == std::errc() && ri.ptr == last;
    }
  }

  static bool isdigit(char c) { return c >= '0' && c <= '9'; }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) error("truncated \\u escape");
    unsigned cp = 0;
    for (int i = 0; i < 4; ++i) {
      char c = s_[pos_++];
      cp <<= 4;
      if (c >= '0' && c <= '9') cp |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') cp |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') cp |= static_cast<unsigned>(c - 'A' + 10);
      else { --pos_; error("invalid \\u escape"); }
    }
    return cp;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (at_end()) error("unterminated string");
      char c = s_[pos_];
      if (c == '"') { ++pos_; return out; }
      if (static_cast<unsigned char>(c) < 0x20) error("control character in a string");
      if (c != '\\') { out += c; ++pos_; continue; }
      ++pos_;
      if (at_end()) error("unterminated string");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          // a high surrogate followed by a low one is one code point; a lone one is kept as is
          if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(pos_, 2, "\\u") == 0) {
            size_t save = pos_;
            pos_ += 2;
            unsigned lo = hex4();
            if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            else pos_ = save;
          }
          append_utf8(out, cp);
          break;
        }
        default: --pos_; error("invalid escape in a string");
      }
    }
  }

  const std::string& s_;
  size_t pos_ = 0;
};

// Parse a whole JSON document; throws ParseError.
inline Value parse(const std::string& text) { return Parser(text).parse_document(); }

}  // namespace sjson
